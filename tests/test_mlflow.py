"""MLflow beside rayline, against a real `mlflow server` (SQLite backend, a local artifact
root, a free loopback port) read back through MLflow's own client: runs, parameters and
metric series, a nested sweep, model versions with their tags, aliases after promotions,
a gated refusal, a canary rollback, a server killed and then `rayline models sync`."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from rayline import cli, pipelines
from rayline.config import ConfigError, from_dict
from rayline.rl.config import DQNConfig
from rayline.store import ModelRegistry
from test_boosting import export_sklearn, sweep_config
from test_serving import register_policy

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MLflowServer:
    """`mlflow server` on 127.0.0.1, its state in `folder` (kept across restarts)."""

    def __init__(self, folder):
        self.folder = folder
        self.log = folder / "server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder}/mlflow.db",
                "--default-artifact-root",
                f"{self.folder}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            start_new_session=True,  # its workers go with it
            # Without MLflow's job runner (its 7 consumers are for MLflow's own GenAI
            # jobs, which rayline never asks for): 15 CPU-seconds a start on 2 cores.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not answer in 120 s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = MLflowServer(tmp_path_factory.mktemp("mlflow"))
    running.start()
    yield running
    if running.proc.poll() is None:
        running.kill()


def tiny_dqn(tmp_path, name: str, mlflow_settings: dict):
    return from_dict(
        DQNConfig,
        {
            "env": {"id": "CartPole-v1", "num_envs_per_collector": 4},
            "network": {"hidden_sizes": [32, 32]},
            "learner": {"learning_starts_env_steps": 200, "batches_per_fetch": 8},
            "collectors": {"num_collectors": 2, "env_steps_per_call": 64},
            "eval": {"every_env_steps": 500, "episodes": 3, "solved_return": None},
            "run": {
                "name": name,
                "total_env_steps": 1500,
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
                "promote": "gated",
                "report_every_s": 1.0,
                "mlflow": mlflow_settings,
            },
        },
    )


@pytest.mark.slow
def test_a_dqn_run_is_an_mlflow_run_and_its_model_version(ray_session, server, tmp_path):
    cfg = tiny_dqn(tmp_path, "tracked", {"tracking_uri": server.uri, "registry": True})
    outcome = pipelines.run(pipelines.get_pipeline("dqn"), cfg, sweep=False)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["learner.lr"] == "0.001" and run.data.params["env.id"] == "CartPole-v1"
    assert run.data.tags["rayline.pipeline"] == "dqn" and run.data.tags["rayline.family"] == "rl"
    assert run.data.tags["rayline.stop_reason"] == outcome.best.metrics["stop_reason"]
    assert run.data.tags["rayline.registered"] == "tracked v1"
    assert run.data.tags["rayline.model_uri"].endswith("/store/models/tracked/1")
    # Series against the family's own step: env steps, one point per report.
    history = client.get_metric_history(run.info.run_id, "eval_return_mean")
    steps = [point.step for point in history]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] >= 1500, steps
    assert history[-1].value == pytest.approx(outcome.best.metrics["eval_return_mean"])
    # The registry: the version, its tags, the alias the gated promotion moved.
    (version,) = client.search_model_versions("name='tracked'")
    assert version.tags["rayline.version"] == "1" and version.tags["rayline.kind"] == "dqn"
    assert version.tags["rayline.metric.registered_eval_return"] == str(
        outcome.version.metrics["registered_eval_return"]
    )
    assert version.run_id == run.info.run_id  # its files: artifacts of the run it came from
    assert version.tags["rayline.source"].endswith("/store/models/tracked/1")
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "rayline-model")}
    assert stored == {f"rayline-model/{f}" for f in outcome.version.files}
    folder = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="rayline-model/policy.pt", tracking_uri=server.uri
    )
    registry = ModelRegistry(str(tmp_path / "store"))
    assert Path(folder).read_bytes() == registry.read_file(outcome.version, "policy.pt")
    assert client.get_model_version_by_alias("tracked", "production").version == version.version


@pytest.mark.slow
def test_a_sweep_is_one_parent_run_with_a_child_per_trial(ray_session, server, tmp_path):
    export_sklearn("breast_cancer", str(tmp_path))
    cfg = sweep_config(
        tmp_path,
        str(tmp_path / "breast_cancer.parquet"),
        "swept",
        run__mlflow={"tracking_uri": server.uri, "experiment": "xgb-sweeps"},
    )
    pipeline = pipelines.get_pipeline("xgboost")
    outcome = pipelines.run(pipeline, cfg, sweep=True)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("xgb-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("rayline.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(outcome.results) == 3
    assert {c.data.tags["rayline.family"] for c in children} == {"boosting"}
    etas = {c.data.params["params.eta"] for c in children}
    assert len(etas) == 3  # each trial's own sampled value
    for child in children:  # a series per boosting round
        steps = [p.step for p in client.get_metric_history(child.info.run_id, "valid_loss")]
        assert steps and steps == sorted(steps) and steps[0] >= 1
    best = [c for c in children if c.data.tags.get("rayline.registered") == "swept v1"]
    assert (
        len(best) == 1 and best[0].data.tags["rayline.trial_id"] == outcome.best.metrics["trial_id"]
    )
    assert parent.info.status == "FINISHED"


def test_a_resumed_sweep_takes_again_a_trial_run_made_after_the_last_save(server, tmp_path):
    """Tune saves the callback's state, then the interruption comes while a trial's run
    is being made: the resumed sweep finds that run by its trial id, not a second one
    (seen once: 5 child runs of a 4-trial sweep)."""
    import types

    from rayline.mlflow_tracking import tracking_callback

    export_sklearn("breast_cancer", str(tmp_path))
    cfg = sweep_config(
        tmp_path,
        str(tmp_path / "breast_cancer.parquet"),
        "adopted",
        run__mlflow={"tracking_uri": server.uri, "experiment": "xgb-adopted"},
    )
    pipeline = pipelines.get_pipeline("xgboost")
    first = tracking_callback(pipeline, cfg, sweep=True)
    first.setup()
    trial = types.SimpleNamespace(trial_id="t_00000", config={"eta": 0.1}, last_result={})
    first._calls().drain(30)
    saved = first.get_state()  # Tune's save, before the trial started
    first.on_trial_start(0, [], trial)
    assert first._calls().drain(30) == 0
    resumed = tracking_callback(pipeline, cfg, sweep=True)
    resumed.set_state(saved)
    resumed.setup()
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_complete(0, [], trial)
    assert resumed._calls().drain(30) == 0
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("xgb-adopted")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("rayline.trial_id") == "t_00000"]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert resumed.get_state()["runs"] == {"t_00000": children[0].info.run_id}


def test_a_recommender_sweep_tracks_each_trial_and_mirrors_its_version(
    ray_session, server, tmp_path
):
    """The recommender family through the same callback: a child run per trial with its
    sampled `k`, its metrics, the registered trial tagged, the version mirrored."""
    from test_recsys import knn_sweep_config

    settings = {"tracking_uri": server.uri, "experiment": "recs", "registry": True}
    cfg = knn_sweep_config(tmp_path, mlflow=settings)
    outcome = pipelines.run(pipelines.get_pipeline("recommender"), cfg, sweep=True)
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("recs").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("rayline.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {c.data.params["user_knn.k"] for c in children} == {"2", "20"}
    assert {c.data.tags["rayline.family"] for c in children} == {"recsys"}
    (best,) = [c for c in children if c.data.tags.get("rayline.registered") == "rec v1"]
    assert best.data.params["user_knn.k"] == str(outcome.best.config["user_knn"]["k"])
    # MLflow refuses `@` in a name (a batch holding one is refused whole): renamed.
    assert best.data.metrics["valid_ndcg_at_10"] == pytest.approx(
        outcome.best.metrics["valid_ndcg@10"]
    )
    history = client.get_metric_history(best.info.run_id, "valid_ndcg_at_10")
    assert history and history[-1].value == pytest.approx(outcome.best.metrics["valid_ndcg@10"])
    (version,) = client.search_model_versions("name='rec'")
    assert version.tags["rayline.kind"] == "recommender" and version.run_id == best.info.run_id
    assert version.tags["rayline.metric.test_ndcg_at_10"] == str(
        outcome.version.metrics["test_ndcg@10"]
    )


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def models(capsys, store: str, *args: str) -> Ran:
    """`rayline models --store STORE ARGS...`, in this process (its exit code and output)."""
    code = cli.main(["models", "--store", store, *args])
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def test_the_registry_follows_promotions_refusals_rollbacks_and_an_outage(server, tmp_path, capsys):
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    for seed in (1, 1, 3):  # v2 plays exactly as v1: a gate can only refuse it
        register_policy(registry, seed, name="pole")
    client = MlflowClient(server.uri)

    promoted = models(capsys, store, "promote", "pole", "1", "--mlflow", server.uri)
    assert promoted.returncode == 0, promoted.stderr
    versions = {v.tags["rayline.version"]: v for v in client.search_model_versions("name='pole'")}
    assert set(versions) == {"1", "2", "3"}
    assert versions["2"].tags["rayline.kind"] == "dqn"
    assert client.get_model_version_by_alias("pole", "production").tags["rayline.version"] == "1"

    # A gated promotion the candidate loses (the same weights: a difference of exactly 0).
    refused = models(
        capsys, store, "promote", "pole", "2", "--gate", "--episodes", "4", "--mlflow", server.uri
    )
    assert refused.returncode == 3, refused.stderr
    refusal = client.get_model_version("pole", versions["2"].version).tags
    assert "comparison" in refusal["rayline.promotion_refused.production"]
    assert client.get_model_version_by_alias("pole", "production").tags["rayline.version"] == "1"

    # A canary, then its rollback by a replica (the registry call replicas make).
    canary = models(
        capsys, store, "promote", "pole", "3", "--alias", "canary", "--mlflow", server.uri
    )
    assert canary.returncode == 0, canary.stderr
    assert client.get_registered_model("pole").aliases == {
        "production": versions["1"].version,
        "canary": versions["3"].version,
    }
    assert registry.roll_back("pole", "canary", 3, reason="error rate")
    synced = models(capsys, store, "sync", "pole", "--mlflow", server.uri)
    assert synced.returncode == 0 and "alias canary removed" in synced.stdout
    assert "canary" not in client.get_registered_model("pole").aliases

    # MLflow killed: rayline's registry moves, the verb says what was not mirrored, exit 0.
    server.kill()
    started = time.monotonic()
    offline = models(capsys, store, "promote", "pole", "3", "--mlflow", server.uri)
    assert offline.returncode == 0
    assert time.monotonic() - started < 60
    assert "pole not mirrored to" in offline.stderr and "rayline models sync pole" in offline.stderr
    assert registry.aliases("pole")["production"] == 3
    assert models(capsys, store, "sync", "--mlflow", server.uri).returncode == 1  # says so, named
    server.start()
    caught_up = models(capsys, store, "sync", "--mlflow", server.uri)
    assert caught_up.returncode == 0 and "alias production" in caught_up.stdout
    assert client.get_model_version_by_alias("pole", "production").tags["rayline.version"] == "3"
    again = models(capsys, store, "sync", "--mlflow", server.uri)
    assert again.stdout.strip() == f"pole: in step with {server.uri}"  # idempotent


def test_serving_mirrors_a_replicas_rollback_while_it_happens(server, tmp_path, capsys):
    """`rayline serve --mlflow`'s thread (mlflow_sync.follow): the served model mirrored
    at once, then a canary rolled back in the store as a replica does it (it holds no
    MLflow credentials) leaves MLflow's canary alias within a period, with no verb run."""
    import threading

    from rayline import mlflow_sync

    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    for seed in (1, 2):
        register_policy(registry, seed, name="live")
    registry.promote("live", 1)
    registry.promote("live", 2, "canary")
    client = MlflowClient(server.uri)
    stop = threading.Event()
    watcher = threading.Thread(
        target=mlflow_sync.follow,
        args=(server.uri, ModelRegistry(store, read_only=True), ["live"], stop, 0.2),
    )
    watcher.start()
    try:
        # Both aliases: the sync sets them one after the other (canary first, seen read
        # between the two on a loaded machine).
        mirrored = {"production": "1", "canary": "2"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and aliases(client, "live") != mirrored:
            time.sleep(0.2)
        assert aliases(client, "live") == mirrored
        registry.roll_back("live", "canary", 2, serving=1, reason="error rate 40.0%")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "canary" in aliases(client, "live"):
            time.sleep(0.2)
        assert aliases(client, "live") == {"production": "1"}
    finally:
        stop.set()
        watcher.join(10)
    assert not watcher.is_alive()
    assert "rayline: MLflow: live: " in capsys.readouterr().out


def aliases(client, name: str) -> dict[str, str]:
    """MLflow's aliases of `name` -> rayline's version number they point at."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {}
    found = {}
    for alias, number in model.aliases.items():
        version = client.get_model_version(name, number)
        found[alias] = version.tags["rayline.version"]
    return found


def test_mlflow_settings_without_the_package_are_refused_before_anything_runs(
    tmp_path, monkeypatch, capsys
):
    """run.mlflow, `models promote --mlflow`, `models sync` and `serve --mlflow` without
    the optional package: one line naming the setting and the extra, exit 2; the alias
    not moved."""
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    register_policy(registry, 1, name="bare")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    for verb in (
        ["models", "--store", store, "promote", "bare", "1", "--mlflow", "http://127.0.0.1:9"],
        ["models", "--store", store, "sync", "--mlflow", "http://127.0.0.1:9"],
        ["serve", "--store", store, "--mlflow", "http://127.0.0.1:9", "--alias", "latest"],
    ):
        assert cli.main(verb) == 2, verb
        err = capsys.readouterr().err
        assert "--mlflow: needs the mlflow package" in err and "rayline[mlflow]" in err, err
    assert "production" not in registry.aliases("bare")
    cfg = tiny_dqn(tmp_path, "untracked", {"tracking_uri": str(tmp_path / "mlruns")})
    with pytest.raises(ConfigError, match="run.mlflow.tracking_uri: needs the mlflow package"):
        pipelines.prepare(pipelines.get_pipeline("dqn"), cfg)
    cfg = tiny_dqn(tmp_path, "untracked", {"registry": True})
    with pytest.raises(ConfigError, match="run.mlflow.registry: needs run.mlflow.tracking_uri"):
        pipelines.prepare(pipelines.get_pipeline("dqn"), cfg)
    assert not (tmp_path / "store" / "models" / "untracked").exists()


def test_a_run_goes_on_when_mlflow_is_not_there(tmp_path, capsys):
    """Tracking calls to a port nothing listens on: one warning line, the calls held and
    counted at the end; nothing waits longer than the stated timeout."""
    from rayline.mlflow_sync import DRAIN_PATIENCE, Calls

    made = []
    failures = iter([OSError("connection refused")] * 2)

    def flaky() -> None:
        error = next(failures, None)
        if error:
            raise error
        made.append("ok")

    calls = Calls("http://user:secret@127.0.0.1:9", retry_s=0.05)
    calls.submit(flaky)
    calls.submit(lambda: made.append("next"))
    assert calls.drain(10) == 0 and made == ["ok", "next"]
    err = capsys.readouterr().err
    assert err.count("did not answer") == 1 and "answers again" in err
    assert "secret" not in err and "user" not in err  # a URI's credentials never shown
    # A call MLflow answers with a refusal (a 4xx) is dropped, not retried before the rest.
    from mlflow.exceptions import RestException

    def bad_name() -> None:  # what the client raises for the server's 400
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"})

    made.clear()
    picky = Calls("http://127.0.0.1:9", retry_s=60)
    picky.submit(bad_name)
    picky.submit(lambda: made.append("after"))
    assert picky.drain(5) == 1 and made == ["after"]
    assert "refused a call" in capsys.readouterr().err
    never = Calls("http://127.0.0.1:9", retry_s=0.05)
    never.submit(lambda: (_ for _ in ()).throw(OSError("refused")))
    started = time.monotonic()
    assert never.drain(0.5) == 1 and time.monotonic() - started < 2
    # A slow server that answers is waited for, past the timeout for the whole queue: 8
    # calls of 0.25 s each, drained with 1 s for any one answer.
    made.clear()
    slow = Calls("http://127.0.0.1:9", retry_s=60)
    for number in range(8):
        slow.submit(lambda number=number: (time.sleep(0.25), made.append(number)))
    started = time.monotonic()
    assert slow.drain(1.0) == 0 and made == list(range(8))
    assert time.monotonic() - started >= 1.5
    # One that answers each call just inside the timeout holds the end of a run for
    # DRAIN_PATIENCE timeouts at most, not for the whole queue.
    trickle = Calls("http://127.0.0.1:9", retry_s=60)
    for _ in range(40):
        trickle.submit(lambda: time.sleep(0.2))
    started = time.monotonic()
    assert trickle.drain(0.3) > 20
    assert time.monotonic() - started < DRAIN_PATIENCE * 0.3 + 0.5


def test_a_folder_as_the_tracking_store_is_refused_before_anything_runs(
    tmp_path, monkeypatch, capsys
):
    """MLflow 3 refuses its file store (maintenance mode) unless MLFLOW_ALLOW_FILE_STORE
    is true: said before anything runs, not at the first trial."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = tiny_dqn(tmp_path, "foldered", {"tracking_uri": str(tmp_path / "mlruns")})
    with pytest.raises(ConfigError, match="is a folder, which MLflow 3 takes .* only with"):
        pipelines.prepare(pipelines.get_pipeline("dqn"), cfg)
    store = str(tmp_path / "store")
    register_policy(ModelRegistry(store), 1, name="kept")
    assert cli.main(["models", "--store", store, "sync", "--mlflow", "file:///tmp/x"]) == 2
    assert "sqlite:///PATH/mlflow.db" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's choice: taken
    pipelines.prepare(pipelines.get_pipeline("dqn"), cfg)


def test_no_ray_process_inherits_the_drivers_mlflow_credentials():
    code = (
        "import os, ray\n"
        "from rayline import startup\n"
        "startup.init_ray(None)\n"
        "@ray.remote\n"
        "def seen():\n"
        "    return os.environ.get('MLFLOW_TRACKING_PASSWORD')\n"
        "print(ray.get(seen.remote()), os.environ.get('MLFLOW_TRACKING_PASSWORD'))\n"
        "ray.shutdown()\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths are short
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "s3cret", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.stdout.split()[-2:] == ["None", "s3cret"]  # the worker has none; the driver keeps it
