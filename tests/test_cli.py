"""The command line under bad input, as a user runs it: every mistake is one line on
stderr naming the key or file, exit code 2, before Ray starts, and nothing written
outside the run's folders."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rayline import cli, models_command
from rayline.recsys.data import load_ratings
from rayline.store import STAGING_PREFIX, ModelRegistry

RAYLINE = os.path.join(os.path.dirname(sys.executable), "rayline")
REPO = Path(__file__).resolve().parent.parent


def rayline(tmp_path, *args, timeout=120):
    """Run the console script in `tmp_path/work` with a Ray temp dir of its own, so a
    Ray that started would leave it behind."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray-tmp")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [RAYLINE, *args], capture_output=True, text=True, timeout=timeout, cwd=work, env=env
    )


def assert_one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rayline: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_no_ray_started(tmp_path):
    assert not (tmp_path / "ray-tmp").exists(), "Ray was started"


CARTPOLE = str(REPO / "pipelines" / "dqn-cartpole.yaml")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("env.id=NoSuchEnv-v9", ["env.id", "NoSuchEnv"]),
        ("env.id=MountainCarContinuous-v0", ["env.id", "discrete action space"]),
        ("learner.device=tpu", ["learner.device", "'tpu'"]),
        ("learner.device=cuda", ["learner.device", "learner.num_gpus"]),
        ("run.name=../../etc", ["run.name", "'../../etc'"]),
        ("run.name=a/b", ["run.name"]),
        ("run.name=.hidden", ["run.name"]),
        ("learner.lr=[1,", ["bad override", "not valid YAML"]),
    ],
)
def test_bad_values_are_caught_before_ray_starts(tmp_path, override, needles):
    proc = rayline(tmp_path, "train", CARTPOLE, "--set", override)
    assert_one_line_exit_2(proc, *needles)
    assert_no_ray_started(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["work"]  # nothing written beside the run
    assert not os.listdir(tmp_path / "work")


def test_resume_with_nothing_to_resume_is_caught_before_ray_starts(tmp_path):
    proc = rayline(tmp_path, "train", CARTPOLE, "--resume", "--set", "run.name=never-ran")
    assert_one_line_exit_2(proc, "nothing to resume", "never-ran")
    assert_no_ray_started(tmp_path)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["serve", "--port", "99999"], ["--port", "99999"]),
        (["serve", "--port", "http"], ["--port", "'http'"]),
        (["serve", "--replicas", "0"], ["--replicas", "got 0"]),
        (["serve", "--replicas", "2.5"], ["--replicas", "'2.5'"]),
        (["serve", "--metrics-port", "70000"], ["--metrics-port", "70000"]),
        (["serve", "--prediction-log-flush-s", "0"], ["--prediction-log-flush-s", "got 0"]),
        (["serve", "--prediction-log-flush-s", "nan"], ["--prediction-log-flush-s", "nan"]),
        (["serve", "--metrics-host", "10.0.0.1"], ["--metrics-host", "'10.0.0.1'"]),
        (["train", CARTPOLE, "--metrics-port", "-1"], ["--metrics-port", "-1"]),
        (["data", "export-sklearn", "breast_cancer", "/proc/x"], ["/proc/x"]),
        (["data", "movielens", "/proc/x"], ["/proc/x"]),
        (["config", "show", "nope"], ["nope: not a pipeline family", "dqn-cartpole"]),
        (["train", "nope"], ["nope: no such file", "dqn-cartpole"]),
        (["runs", "show", "../../etc"], ["'../../etc'", "one folder name"]),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, needles):
    proc = rayline(tmp_path, *args)
    assert_one_line_exit_2(proc, *needles)
    assert_no_ray_started(tmp_path)


def test_models_list_survives_a_corrupt_version_and_alias(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    registry.register("good", {"a.json": b"{}"}, kind="dqn")
    registry.register("bad", {"a.json": b"{}"}, kind="dqn")
    registry.register("bad", {"a.json": b"{}"}, kind="dqn")
    registry.promote("bad", 2)
    (tmp_path / "models" / "bad" / "1" / "metadata.json").write_text("{not json")
    (tmp_path / "models" / "good" / "aliases").mkdir()
    (tmp_path / "models" / "good" / "aliases" / "staging.json").write_text('{"version": 7}')

    assert cli.main(["models", "list", "--store", store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {tuple(line.split("\t")[:3]) for line in lines}
    assert ("bad", "v2", "dqn") in rows and ("good", "v1", "dqn") in rows
    broken = [line for line in lines if "\tBROKEN\t" in line]
    assert len(broken) == 2
    assert any(line.startswith("bad\tv1\tBROKEN") and "corrupted" in line for line in broken)
    assert any(line.startswith("good\t-\tBROKEN") and "staging" in line for line in broken)
    assert (
        cli.main(["models", "--store", store, "list", "--strict"]) == models_command.BROKEN_MODELS
    )


def test_models_list_of_an_unknown_name_lists_the_known_ones(tmp_path, capsys):
    registry = ModelRegistry(str(tmp_path))
    registry.register("alpha", {"a.json": b"{}"}, kind="dqn")
    registry.register("beta", {"a.json": b"{}"}, kind="dqn")
    assert cli.main(["models", "list", "zeta", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'zeta' is not registered" in err and "alpha, beta" in err


def test_a_killed_registration_leaves_nothing_behind(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    model_dir = tmp_path / "models" / "m"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its registration was killed
    killed = model_dir / f"{STAGING_PREFIX}{socket.gethostname()}-{dead.pid}-abc"
    killed.mkdir()
    (killed / "a.json").write_text("{}")
    alive = model_dir / f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-def"
    alive.mkdir()  # one in progress: never swept
    old = model_dir / f"{STAGING_PREFIX}otherhost-1-ghi"
    old.mkdir()
    os.utime(old, (0, 0))  # untouched for decades
    assert registry.versions("m") == [1]  # never listed
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    assert not killed.exists() and not old.exists() and alive.exists()
    assert registry.versions("m") == [1, 2]
    # The killed registration left no event either: the history has the two that landed.
    registered = [e["version"] for e in registry.history("m") if e["event"] == "registered"]
    assert registered == [1, 2]


def test_config_show_lists_every_key_with_its_doc(tmp_path, capsys):
    for name in ("dqn", "xgboost", "recommender", "transfer", "fcn"):
        assert cli.main(["config", "show", name]) == 0
        out = capsys.readouterr().out
        keys = [line for line in out.splitlines() if " = " in line and not line.startswith(" ")]
        docs = [line for line in out.splitlines() if line.startswith("    ")]
        assert len(keys) > 10 and len(docs) == len(keys), (name, out)
    out = rayline(tmp_path, "config", "show", CARTPOLE, "--set", "learner.lr=0.002").stdout
    assert "learner.lr = 0.002  (float)" in out and "env.id = CartPole-v1  (str)" in out


def test_data_movielens_writes_ratings_the_recommender_reads(tmp_path):
    proc = rayline(tmp_path, "data", "movielens", str(tmp_path / "data"), "--users", "30")
    assert proc.returncode == 0, proc.stderr
    ratings = load_ratings(proc.stdout.strip())
    assert ratings.n_users == 30 and ratings.ratings.min() >= 0.5
    assert set((ratings.ratings * 2).tolist()) <= set(range(1, 11))  # half stars
    assert json.loads(json.dumps(float(ratings.ratings.max()))) <= 5.0


def test_serve_on_a_busy_port_is_refused_before_ray_starts(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.promote("m", 1)
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        proc = rayline(tmp_path, "serve", "--store", str(tmp_path / "store"), "--port", str(port))
    assert_one_line_exit_2(proc, "--port", f"127.0.0.1:{port} is not free")
    assert_no_ray_started(tmp_path)


def test_a_busy_metrics_port_or_one_set_for_a_cluster_is_refused_before_ray_starts(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.promote("m", 1)
    store = str(tmp_path / "store")
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = str(other_program.getsockname()[1])
        for command in (["serve", "--store", store], ["train", CARTPOLE]):
            proc = rayline(tmp_path, *command, "--metrics-port", port)
            assert_one_line_exit_2(proc, "--metrics-port", f"127.0.0.1:{port} is not free")
    # A cluster's nodes export on their own ports: the flag would be ignored, so it is refused.
    proc = rayline(
        tmp_path, "serve", "--store", store, "--address", "127.0.0.1:1", "--metrics-port", "9000"
    )
    assert_one_line_exit_2(proc, "--metrics-port", "ray start --metrics-export-port")
    assert_no_ray_started(tmp_path)


def test_serve_beyond_loopback_without_a_key_is_refused_before_ray_starts(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.promote("m", 1)
    store = str(tmp_path / "store")
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.internal"):
        proc = rayline(tmp_path, "serve", "--store", store, "--host", host)
        assert_one_line_exit_2(proc, f"--host {host}", "--allow-no-key")
    assert_no_ray_started(tmp_path)


def test_serve_with_an_unreadable_key_file_fails_closed(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("m", {"a.json": b"{}"}, kind="dqn")
    registry.promote("m", 1)
    store = str(tmp_path / "store")
    proc = rayline(tmp_path, "serve", "--store", store, "--api-key-file", str(tmp_path / "nokey"))
    assert_one_line_exit_2(proc, "--api-key-file", "cannot be read")
    assert_no_ray_started(tmp_path)
