"""After promotion, over real HTTP against the Serve app: canary rollouts (the split, the
header, a user kept on one version, a failing canary rolled back and recorded, a rollout
completed), the metrics and the dashboard, the sampled prediction log."""

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from rayline import cli
from rayline.boosting.data import Table, infer_task
from rayline.boosting.model import BoostedModel
from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
from rayline.config import ConfigError
from rayline.drift import DriftWindow, build_profile, numeric_profile, psi, served_shares
from rayline.recsys import models as recsys_models
from rayline.recsys.data import from_arrays, synthetic_ratings
from rayline.recsys.knn import UserKNN
from rayline.recsys.predictor import recommender_profile
from rayline.rl.networks import build_q_network
from rayline.serving.app import build_app
from rayline.serving.canary import CanaryArgs, Rollout, unit_hash
from rayline.serving.metrics import LoopLag, Recorder
from rayline.store import ModelRegistry
from test_serving import SPEC, register_policy

CREDIT_ROWS = np.random.default_rng(7).normal(size=(300, 3)).astype(np.float32)
PORT = 18131
URL = f"http://127.0.0.1:{PORT}"
FRACTION = 0.2


def boosted(features: list[str], x: np.ndarray | None = None):
    """A small binary XGBoost model on the named features (the last matters most), fit
    on `x` (else standard normal rows)."""
    rng = np.random.default_rng(len(features))
    x = rng.normal(size=(300, len(features))).astype(np.float32) if x is None else x
    label = (x[:, -1] + 0.3 * x[:, 0] > 0).astype(np.int64)
    table = Table(x, label, features, ["q"] * len(features), {})
    train, valid = table.subset(np.arange(240)), table.subset(np.arange(240, 300))
    task = infer_task(train.label)
    params = booster_params(TreeParams(max_depth=3), task, threads=1, seed=0)
    return fit(
        params, task, train.dmatrix(), valid.dmatrix(), rounds=10, tracker=BestRound(task, 0)
    )


def recommender(k: int):
    data, _ = synthetic_ratings(30, 20, seed=0)
    named = from_arrays(
        np.array([f"u{u}" for u in data.users]),
        np.array([f"m{i}" for i in data.items]),
        data.ratings,
    )
    return UserKNN(similarity="cosine", k=k, shrinkage=0).fit(named).save()


@pytest.fixture(scope="module")
def canaried(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    registry = ModelRegistry(store)
    register_policy(registry, seed=1)
    register_policy(registry, seed=2)
    registry.promote("cartpole", 1)
    registry.promote("cartpole", 2, "canary")
    for k in (3, 8):
        registry.register("movies", recommender(k), kind="recommender", metrics={})
    registry.promote("movies", 1)
    registry.promote("movies", 2, "canary")
    # The canary needs a feature the clients' rows lack: it answers 400 where v1 answers.
    registry.register("risk", boosted(["a", "b", "c"]).files(), kind="xgboost", metrics={})
    registry.register("risk", boosted(["a", "b", "c", "d"]).files(), kind="xgboost", metrics={})
    registry.promote("risk", 1)
    registry.promote("risk", 2, "canary")
    # With its drift reference, as the XGBoost pipeline registers one: the training rows.
    model = boosted(["a", "b", "c"], CREDIT_ROWS)
    files = {**model.files(), "profile.json": json.dumps(model.profile(CREDIT_ROWS)).encode()}
    registry.register("credit", files, kind="xgboost", metrics={})
    registry.promote("credit", 1)
    registry.promote("credit", 1, "canary")  # shadowed by itself
    # A policy with the drift reference its pipeline stores: observations and actions.
    register_policy(registry, seed=3, name="pole")
    observations = np.random.default_rng(3).normal(size=(2000, 4))
    policy = build_q_network(SPEC)
    policy.load_state_dict(
        torch.load(
            io.BytesIO(registry.read_file(registry.get("pole", 1), "policy.pt")), weights_only=True
        )
    )
    actions = policy(torch.as_tensor(observations, dtype=torch.float32)).argmax(1).numpy()
    profile = build_profile(observations, [f"obs[{i}]" for i in range(4)], actions, [0, 1])
    files = registry.read_files(registry.get("pole", 1))
    registry.register("pole", {**files, "profile.json": json.dumps(profile).encode()}, kind="dqn")
    registry.promote("pole", 2)
    # A recommender with the profile its pipeline stores: users' activity, answers' popularity.
    files = recommender(5)
    profile = recommender_profile(recsys_models.load(files))
    registry.register(
        "shelf", {**files, "profile.json": json.dumps(profile).encode()}, kind="recommender"
    )
    registry.promote("shelf", 1)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    args = {
        "store_uri": store,
        "poll_s": 0.2,
        "canary_fraction": {"cartpole": FRACTION, "movies": 0.5, "risk": 0.5},
        # Latency rollback is judged on hand-made windows below; here the load of other
        # tests beside this one would make it a coin toss.
        "canary": {"window_requests": 100, "min_requests": 20, "max_p99_ratio": 50},
        "shadow": ["credit"],
    }
    serve.run(build_app(args), name="rayline", route_prefix="/")
    with httpx.Client(base_url=URL, timeout=30) as client:
        yield registry, client
    serve.shutdown()


REQUESTS = 1000
"""Requests of a canary's split: each is a round trip through Serve's proxy."""


def test_a_canary_takes_its_share_and_every_answer_names_its_version(canaried):
    registry, client = canaried
    observation = {"observations": [0.1, 0.2, 0.3, 0.4]}
    counts = {"cartpole/1": 0, "cartpole/2": 0}
    for _ in range(REQUESTS):
        answer = client.post("/dqn/cartpole/act", json=observation)
        assert answer.status_code == 200, answer.text
        header = answer.headers["x-rayline-model"]
        assert header == f"cartpole/{answer.json()['version']}"
        counts[header] += 1
    # 1,000 draws at 0.2: 200 expected, sd 12.6; the 99.9 % two-sided bounds are 3.29 sd
    # (41 requests: a share of 0.25 or 0.15 falls outside them).
    sd = np.sqrt(REQUESTS * FRACTION * (1 - FRACTION))
    assert abs(counts["cartpole/2"] - REQUESTS * FRACTION) <= 3.29 * sd, counts
    listed = {
        (m["name"], m["role"]): m
        for m in client.get("/models").json()["models"]
        if m["name"] == "cartpole"
    }
    assert listed["cartpole", "serving"]["version"] == 1
    assert ("cartpole", "canary") in listed, client.get("/models").json()
    assert listed["cartpole", "canary"]["version"] == 2
    assert listed["cartpole", "canary"]["canary_fraction"] == FRACTION
    share = listed["cartpole", "canary"]["share"]
    assert share == pytest.approx(counts["cartpole/2"] / REQUESTS, abs=0.01), (share, counts)

    # `rayline models promote cartpole canary` completes the rollout: all traffic to v2.
    assert cli.main(["models", "promote", "cartpole", "canary", "--store", registry.uri]) == 0
    assert registry.resolve("cartpole", "production") == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and serving_version(client, "cartpole") != 2:
        time.sleep(0.1)
    versions = {
        client.post("/dqn/cartpole/act", json=observation).json()["version"] for _ in range(50)
    }
    assert versions == {2}
    assert not any(e["event"] == "rolled_back" for e in registry.history("cartpole"))
    assert not any(
        m["role"] == "canary"
        for m in client.get("/models").json()["models"]
        if m["name"] == "cartpole"
    )


def serving_version(client, name: str) -> int | None:
    listed = client.get("/models").json()["models"]
    return next(
        (m["version"] for m in listed if m["name"] == name and m["role"] == "serving"), None
    )


def test_a_user_sees_one_version_every_time(canaried):
    _, client = canaried
    seen: dict[str, set[str]] = {}
    for user in [f"u{u}" for u in range(20)]:
        for _ in range(5):
            answer = client.get(f"/recommend/{user}?k=5&model=movies")
            assert answer.status_code == 200, answer.text
            seen.setdefault(user, set()).add(answer.headers["x-rayline-model"])
    assert all(len(versions) == 1 for versions in seen.values()), seen
    # The split is by a hash of the user id: the same on any replica, computable here.
    expected = {u: "movies/2" if unit_hash(f"movies\0{u}") < 0.5 else "movies/1" for u in seen}
    assert {u: v.pop() for u, v in seen.items()} == expected
    assert set(expected.values()) == {"movies/1", "movies/2"}


def test_a_failing_canary_is_rolled_back_within_its_window_and_recorded(canaried, capsys):
    registry, client = canaried
    rows = {"rows": [{"a": 0.1, "b": 0.2, "c": -1.0}]}
    statuses: list[tuple[str, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.post("/xgboost/risk/predict", json=rows)
        statuses.append((answer.headers.get("x-rayline-model"), answer.status_code))
        if any(e["event"] == "rolled_back" for e in registry.history("risk")):
            break
    canary_answers = [status for version, status in statuses if version == "risk/2"]
    assert canary_answers and set(canary_answers) == {400}  # it refuses the rows v1 takes
    assert len(canary_answers) <= 100  # within its window
    assert all(status == 200 for version, status in statuses if version == "risk/1")
    event = next(e for e in registry.history("risk") if e["event"] == "rolled_back")
    assert event["alias"] == "canary" and event["version"] == 2 and event["serving"] == 1
    assert event["canary_error_rate"] == 1.0 and "error rate" in event["reason"]
    assert "canary" not in registry.aliases("risk")
    after = [client.post("/xgboost/risk/predict", json=rows) for _ in range(200)]
    assert {a.status_code for a in after} == {200}
    assert {a.headers["x-rayline-model"] for a in after} == {"risk/1"}
    listing = client.get("/models").json()
    assert any(r["name"] == "risk" and r["version"] == 2 for r in listing["rolled_back"])
    assert not any(s >= 500 for _, s in statuses)
    capsys.readouterr()
    assert cli.main(["models", "history", "risk", "--store", registry.uri]) == 0
    history = capsys.readouterr().out
    assert "rolled_back\tcanary: v2 removed: error rate 100.0%" in history, history


def test_drift_is_low_on_training_like_rows_and_names_the_shifted_feature(canaried):
    _, client = canaried
    rng = np.random.default_rng(11)

    def send(rows: np.ndarray) -> None:
        for batch in np.array_split(rows, len(rows) // 50):
            body = {"rows": [dict(zip("abc", map(float, row))) for row in batch]}
            assert client.post("/xgboost/credit/predict", json=body).status_code == 200

    # One request of 50 rows: too few for a PSI to mean anything, nothing is drifted.
    send(rng.normal(size=(50, 3)))
    early = client.get("/models/credit/drift").json()
    assert early["window"] == 50 and early["insufficient_data"] and not early["drifted"], early
    assert early["max_psi"] is None and early["min_window"] == 200, early
    # Rows drawn from the training distribution: nothing drifted.
    send(rng.normal(size=(1000, 3)))
    report = client.get("/models/credit/drift").json()
    assert report["name"] == "credit" and report["version"] == 1 and report["window"] == 1000
    assert report["max_psi"] < 0.1 and not report["drifted"], report
    # The same rows with b shifted by 3 standard deviations: b drifted, a and c did not.
    shifted = rng.normal(size=(1000, 3))
    shifted[:, 1] += 3.0
    send(shifted)
    report = client.get("/models/credit/drift").json()
    assert report["features"]["b"] > 0.25 and report["drifted"], report
    assert report["features"]["a"] < 0.1 and report["features"]["c"] < 0.1, report
    # A DQN policy: its observations, per dimension, and its actions.
    rows = rng.normal(size=(500, 4))
    rows[:, 2] -= 3.0
    for batch in np.array_split(rows, 10):
        assert (
            client.post("/dqn/pole/act", json={"observations": batch.tolist()}).status_code == 200
        )
    report = client.get("/models/pole/drift").json()
    assert report["version"] == 2 and report["window"] == 500, report
    assert report["features"]["obs[2]"] > 0.25 and report["features"]["obs[0]"] < 0.1, report
    # A recommender: every training user seven times, as its profile has them, then cold
    # users.
    for user in list(range(30)) * 7:
        assert (
            client.get(f"/recommend/u{user}", params={"k": 10, "model": "shelf"}).status_code == 200
        )
    report = client.get("/models/shelf/drift").json()
    assert report["window"] == 210, report
    assert report["features"]["user_activity"] < 0.1 and report["outputs_psi"] < 0.1, report
    for user in range(420):  # users the model never saw: activity 0, the most popular items
        assert (
            client.get(f"/recommend/stranger{user}", params={"k": 10, "model": "shelf"}).status_code
            == 200
        )
    report = client.get("/models/shelf/drift").json()
    assert report["features"]["user_activity"] > 0.25 and report["drifted"], report
    # A model with no profile says so; an unknown one too.
    unprofiled = client.get("/models/movies/drift")
    assert unprofiled.status_code == 404 and "no reference profile" in unprofiled.json()["detail"]
    assert client.get("/models/nope/drift").status_code == 404


def test_a_shadow_of_the_serving_version_agrees_and_changes_no_answer(canaried):
    registry, client = canaried
    model = BoostedModel.from_files(registry.read_files(registry.get("credit", 1)))
    rows = np.random.default_rng(5).normal(size=(20, 3)).astype(np.float32)
    for row in rows:
        answer = client.post(
            "/xgboost/credit/predict", json={"rows": [dict(zip("abc", map(float, row)))]}
        )
        assert answer.headers["x-rayline-model"] == "credit/1"  # the serving version answers
        expected = model.predict(row[None]).astype(np.float64).tolist()
        assert answer.json()["probabilities"] == pytest.approx(expected, abs=1e-7)
    deadline, shadow = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        listed = client.get("/models").json()["models"]
        shadow = next(m for m in listed if m["name"] == "credit" and m["role"] == "shadow")
        if shadow["compared"] >= 20:
            break
        time.sleep(0.2)
    assert shadow["version"] == 1 and shadow["compared"] >= 20 and shadow["errors"] == 0, shadow
    assert shadow["mean_agreement"] == 1.0 and shadow["mean_mean_abs_difference"] == 0.0, shadow


def test_shadow_agreement_per_family_on_hand_made_answers():
    from rayline.family import served_kinds

    kinds = served_kinds()

    def agreement(kind, a, b, method="predict"):
        return kinds[kind].agreement(method, a, b)

    assert agreement("dqn", {"actions": [0, 1, 1]}, {"actions": [0, 1, 0]}, "act") == {
        "agreement": pytest.approx(2 / 3)
    }
    binary = {"task": "binary", "predictions": [1, 0], "probabilities": [0.9, 0.2]}
    other = {"task": "binary", "predictions": [1, 1], "probabilities": [0.7, 0.6]}
    assert agreement("xgboost", binary, other) == {
        "mean_abs_difference": pytest.approx(0.3),
        "agreement": 0.5,
    }
    regression = {"task": "regression", "predictions": [1.0, 3.0]}
    assert agreement("xgboost", regression, {"task": "regression", "predictions": [2.0, 3.0]}) == {
        "mean_abs_difference": 0.5
    }
    items = {"items": [{"item_id": i, "score": 1.0} for i in ("m1", "m2", "m3", "m4")]}
    theirs = {"items": [{"item_id": i, "score": 1.0} for i in ("m4", "m9", "m1", "m8")]}
    assert agreement("recommender", items, theirs, "recommend") == {"agreement": 0.5}
    top = {"predictions": [[{"class": "cat"}, {"class": "dog"}], [{"class": "dog"}]]}
    flipped = {"predictions": [[{"class": "dog"}, {"class": "cat"}], [{"class": "dog"}]]}
    assert agreement("image_classifier", top, flipped) == {"agreement": 0.5}

    def mask(values) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(np.array(values, dtype=np.uint8), mode="L").save(buffer, format="PNG")
        return {"mask_png": base64.b64encode(buffer.getvalue()).decode()}

    a = {"predictions": [mask([[0, 1], [1, 1]])]}
    b = {"predictions": [mask([[0, 1], [0, 2]])]}  # 2 of 4 pixels the same
    assert agreement("segmenter", a, b) == {"agreement": 0.5}


def wait_logged(client, rows: int, state: str = "written") -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.get("/models").json()["prediction_log"]
        if status[state] >= rows:
            return status
        time.sleep(0.2)
    return status


def test_the_prediction_log_keeps_what_was_asked_and_answered_and_no_header(canaried, tmp_path):
    import pyarrow.dataset as ds

    registry, _ = canaried
    key = "s3cret-key-for-the-log-test"
    (tmp_path / "key").write_text(key)
    log_dir = tmp_path / "log"
    app = {
        "store_uri": registry.uri,
        "models": ["cartpole", "movies"],
        "api_key_file": str(tmp_path / "key"),
        "prediction_log": {"uri": str(log_dir), "sample": 1.0, "flush_s": 0.3},
    }
    serve.run(build_app(app), name="logged", route_prefix="/logged")
    sent: dict[str, tuple[str, str]] = {}
    with httpx.Client(base_url=f"{URL}/logged", headers={"X-API-Key": key}, timeout=30) as client:
        for i in range(30):
            body = json.dumps({"observations": [i / 10, 0.0, -0.1, 0.2]})
            answer = client.post(
                "/dqn/cartpole/act", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 200, answer.text
            sent[body] = ("cartpole", answer.text)
        for user in range(10):
            answer = client.get(f"/recommend/u{user}?k=3")
            assert answer.status_code == 200
            sent[f"u{user}"] = ("movies", answer.text)
        assert client.get("/healthz").status_code == 200  # not a model route: not logged
        status = wait_logged(client, 40)
    assert status["written"] == 40 and status["dropped"] == 0, status
    table = ds.dataset(str(log_dir), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(table) == 40
    posted = [row for row in table if row["route"] == "/dqn/{model}/act"]
    assert {row["request"]: ("cartpole", row["response"]) for row in posted} == {
        k: v for k, v in sent.items() if k.startswith("{")
    }
    serving = registry.resolve("cartpole", "production")
    assert all(
        row["model"] == "cartpole" and row["version"] == serving and row["status"] == 200
        for row in posted
    )
    got = [row for row in table if row["route"] == "/recommend/{user_id}"]
    assert sorted(row["response"] for row in got) == sorted(
        v for k, (_, v) in sent.items() if k.startswith("u")
    )
    assert {row["model"] for row in got} == {"movies"}
    files = list(log_dir.rglob("*.parquet"))
    assert {f.parent.parent.parent.name for f in files} == {"model=cartpole", "model=movies"}
    for f in files:  # no header, so no key, in any byte
        raw = f.read_bytes()
        assert key.encode() not in raw and b"x-api-key" not in raw.lower()
    serve.delete("logged")


def test_an_unwritable_prediction_log_drops_rows_never_requests(canaried, tmp_path):
    registry, _ = canaried
    (tmp_path / "a-file").write_text("not a folder")
    app = {
        "store_uri": registry.uri,
        "models": ["cartpole"],
        "prediction_log": {"uri": str(tmp_path / "a-file" / "log"), "sample": 1.0, "flush_s": 0.3},
    }
    serve.run(build_app(app), name="unlogged", route_prefix="/unlogged")
    with httpx.Client(base_url=f"{URL}/unlogged", timeout=30) as client:
        answers = [
            client.post("/dqn/cartpole/act", json={"observations": [0.0, 0.1, 0.2, 0.3]})
            for _ in range(20)
        ]
        assert {a.status_code for a in answers} == {200}
        status = wait_logged(client, 20, "dropped")
    assert status["dropped"] == 20 and status["written"] == 0, status
    serve.delete("unlogged")


def test_the_prediction_log_holds_at_most_its_byte_budget(ray_session, tmp_path):
    """Rows past `max_bytes` of held bodies are dropped and counted, never held: 10,000
    rows of 1 MiB bodies would have been 20 GB of a replica's memory."""
    from rayline.serving.prediction_log import PredictionLog, PredictionLogArgs

    log = PredictionLog(PredictionLogArgs(uri=str(tmp_path / "log"), sample=1.0, max_bytes=3000))
    scope = {"method": "POST"}
    for _ in range(5):
        log.add("m", 1, "serving", scope, 200, 0.001, b"x" * 1000, b"y" * 400)
    assert log.status() == {"written": 0, "dropped": 3, "held": 2}
    assert log.held_bytes == 2800
    log.flush()
    assert log.status() == {"written": 2, "dropped": 3, "held": 0} and log.held_bytes == 0
    log.add("m", 1, "serving", scope, 200, 0.001, b"x" * 1000, b"y" * 400)
    assert log.status()["held"] == 1


def test_models_in_deployments_of_their_own_get_canaries_shadows_and_drift(canaried):
    """The same rollout, shadow and drift for models held by ModelServer deployments
    (`own_deployments`): the gateway splits by the versions they hold, judges the
    canary, and asks them for drift; each publishes its drift gauges itself."""
    import ray

    registry, _ = canaried
    for seed in (4, 5):
        register_policy(registry, seed=seed, name="apart-pole")
    registry.promote("apart-pole", 1)
    registry.promote("apart-pole", 2, "canary")
    for features in (["a", "b", "c"], ["a", "b", "c", "d"]):
        registry.register("apart-risk", boosted(features).files(), kind="xgboost", metrics={})
    registry.promote("apart-risk", 1)
    registry.promote("apart-risk", 2, "canary")
    model = boosted(["a", "b", "c"], CREDIT_ROWS)
    files = {**model.files(), "profile.json": json.dumps(model.profile(CREDIT_ROWS)).encode()}
    registry.register("apart-credit", files, kind="xgboost", metrics={})
    registry.promote("apart-credit", 1)
    registry.promote("apart-credit", 1, "canary")
    names = ["apart-pole", "apart-risk", "apart-credit"]
    app = {
        "store_uri": registry.uri,
        "models": names,
        "poll_s": 0.2,
        "own_deployments": {name: {} for name in names},
        "canary_fraction": {"apart-pole": 0.3, "apart-risk": 0.5},
        "canary": {"window_requests": 100, "min_requests": 20, "max_p99_ratio": 50},
        "shadow": ["apart-credit"],
    }
    serve.run(build_app(app), name="apart", route_prefix="/apart")
    status = serve.status().applications["apart"].deployments
    assert {f"ModelServer-{name}" for name in names} < set(status)
    with httpx.Client(base_url=f"{URL}/apart", timeout=30) as client:
        # The split: 500 requests at 0.3, within the binomial 99.9 % bounds (+-34).
        counts = {"apart-pole/1": 0, "apart-pole/2": 0}
        for _ in range(REQUESTS // 2):
            answer = client.post("/dqn/apart-pole/act", json={"observations": [0.1, 0.2, 0.3, 0.4]})
            assert answer.status_code == 200, answer.text
            header = answer.headers["x-rayline-model"]
            assert header == f"apart-pole/{answer.json()['version']}"
            counts[header] += 1
        half = REQUESTS // 2
        assert abs(counts["apart-pole/2"] - 0.3 * half) <= 3.29 * np.sqrt(half * 0.3 * 0.7), counts
        listed = {(m["name"], m["role"]): m for m in client.get("/models").json()["models"]}
        assert listed["apart-pole", "canary"]["version"] == 2, listed
        assert listed["apart-pole", "canary"]["share"] == pytest.approx(
            counts["apart-pole/2"] / half, abs=0.01
        )
        # A canary that refuses the rows the serving version takes: rolled back, recorded.
        # (The alias goes first and the event follows it: wait for the event.)
        rows = {"rows": [{"a": 0.1, "b": 0.2, "c": -1.0}]}
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            e["event"] == "rolled_back" for e in registry.history("apart-risk")
        ):
            answer = client.post("/xgboost/apart-risk/predict", json=rows)
            statuses.append((answer.headers.get("x-rayline-model"), answer.status_code))
        assert "canary" not in registry.aliases("apart-risk")
        canary_answers = [status for version, status in statuses if version == "apart-risk/2"]
        assert canary_answers and set(canary_answers) == {400} and len(canary_answers) <= 100
        assert all(status == 200 for version, status in statuses if version == "apart-risk/1")
        event = next(e for e in registry.history("apart-risk") if e["event"] == "rolled_back")
        assert event["version"] == 2 and event["serving"] == 1, event
        after = [client.post("/xgboost/apart-risk/predict", json=rows) for _ in range(100)]
        assert {(a.status_code, a.headers["x-rayline-model"]) for a in after} == {
            (200, "apart-risk/1")
        }
        # A shadow of the serving version by itself agrees, and changes no answer.
        expected = BoostedModel.from_files(files)
        rng = np.random.default_rng(12)
        for row in rng.normal(size=(20, 3)).astype(np.float32):
            body = {"rows": [dict(zip("abc", map(float, row)))]}
            answer = client.post("/xgboost/apart-credit/predict", json=body)
            assert answer.headers["x-rayline-model"] == "apart-credit/1"
            assert answer.json()["probabilities"] == pytest.approx(
                expected.predict(row[None]).astype(np.float64).tolist(), abs=1e-7
            )
        deadline, shadow = time.monotonic() + 20, {}
        while time.monotonic() < deadline and shadow.get("compared", 0) < 20:
            listed = client.get("/models").json()["models"]
            shadow = next(
                m for m in listed if m["name"] == "apart-credit" and m["role"] == "shadow"
            )
        assert shadow["compared"] >= 20 and shadow["errors"] == 0, shadow
        assert shadow["mean_agreement"] == 1.0 and shadow["mean_mean_abs_difference"] == 0.0
        # Drift, kept by the deployment's replica, asked through the gateway.
        calm = rng.normal(size=(1000, 3))
        for batch in np.array_split(calm, 20):
            body = {"rows": [dict(zip("abc", map(float, row))) for row in batch]}
            assert client.post("/xgboost/apart-credit/predict", json=body).status_code == 200
        report = client.get("/models/apart-credit/drift").json()
        assert report["window"] == 1000 and report["max_psi"] < 0.1, report
        shifted = rng.normal(size=(1000, 3))
        shifted[:, 1] += 3.0
        for batch in np.array_split(shifted, 20):
            body = {"rows": [dict(zip("abc", map(float, row))) for row in batch]}
            assert client.post("/xgboost/apart-credit/predict", json=body).status_code == 200
        report = client.get("/models/apart-credit/drift").json()
        assert report["features"]["b"] > 0.25 and report["drifted"], report
        unprofiled = client.get("/models/apart-pole/drift")
        assert unprofiled.status_code == 404, unprofiled.text
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, seen = time.monotonic() + 60, False
    while time.monotonic() < deadline and not seen:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        seen = any(
            line.startswith("ray_rayline_drift_max_psi{") and 'model="apart-credit"' in line
            for line in text.splitlines()
        )
        time.sleep(1)
    assert seen, "the deployment's drift gauge never reached Prometheus"
    serve.delete("apart")


def rollout(**args) -> Rollout:
    return Rollout("m", 0.5, CanaryArgs(**{"window_requests": 10, "min_requests": 4, **args}))


def test_psi_and_the_drift_window_on_known_answers():
    # Two bins, half and half, against a quarter and three quarters: by hand,
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5) = 0.27465.
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.274653, abs=1e-6)
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    reference = np.arange(1000, dtype=np.float64)
    profile = numeric_profile(reference)
    assert len(profile["edges"]) == 9 and profile["shares"][:10] == pytest.approx([0.1] * 10)
    assert profile["shares"][10] == 0.0  # the missing values' share
    assert served_shares(profile, np.array([np.nan, 5.0, 995.0, 2000.0])) == pytest.approx(
        [0.25] + [0.0] * 8 + [0.5, 0.25]
    )
    # A feature constant in training: any other value is in a bin of its own.
    constant = numeric_profile(np.full(100, 32.0))
    assert constant["shares"] == [0.0, 1.0, 0.0, 0.0]
    assert served_shares(constant, np.array([31.0, 32.0, 48.0, 48.0])) == [0.25, 0.25, 0.5, 0.0]
    full = build_profile(reference[:, None], ["x"], (reference > 499).astype(int), [0, 1])
    window = DriftWindow(full, size=200)
    # Under MIN_DRIFT_ROWS rows, no verdict: one row alone gave PSI 8.28, "drifted".
    window.add(np.array([[3.0]]), np.array([0]))
    assert window.report() == {
        "window": 1,
        "insufficient_data": True,
        "min_window": 200,
        "features": {},
        "outputs_psi": None,
        "max_psi": None,
        "drifted": False,
    }
    assert window.report(min_rows=1)["max_psi"] > 0.25  # what the noise alone says
    window.add(np.arange(0, 1000, 5, dtype=np.float64)[:, None], np.repeat([0, 1], 100))
    calm = window.report()
    assert calm["window"] == 200 and not calm["insufficient_data"]
    assert calm["max_psi"] < 1e-9 and not calm["drifted"]
    window.add(np.full((200, 1), 950.0), np.ones(200))  # the ring buffer: only these now
    moved = window.report()
    assert moved["features"]["x"] > 0.25 and moved["outputs_psi"] > 0.25 and moved["drifted"]
    # Rows added one call at a time wait by reference and join the ring in order: 250
    # single rows, the first 50 at 950 and the last 200 calm, hold only the calm ones;
    # what waits never reaches the ring's size.
    for i in range(250):
        window.add(np.array([[950.0 if i < 50 else 5.0 * (i - 50)]]), np.array([int(i >= 150)]))
        assert window.pending_rows < 200
    again = window.report()
    assert again["window"] == 200 and again["max_psi"] < 1e-9 and not again["drifted"]


def test_rollout_judges_error_rates_and_p99_on_hand_made_windows():
    errors = rollout(max_error_rate_delta=0.2)
    for i in range(10):
        errors.record("serving", 1, error=i < 1, latency_s=0.01)  # 10 %
    for error in (True, False, False):
        errors.record("canary", 2, error, 0.01)
    assert errors.verdict(1, 2) is None  # 3 outcomes: too few to judge
    errors.record("canary", 2, False, 0.01)  # 1 in 4 = 25 %: 15 points over, margin 20
    assert errors.verdict(1, 2) is None
    errors.record("canary", 2, True, 0.01)  # 2 in 5 = 40 %: 30 points over
    verdict = errors.verdict(1, 2)
    assert verdict["canary_error_rate"] == 0.4 and verdict["serving_error_rate"] == 0.1
    assert "40.0%" in verdict["reason"] and "10.0%" in verdict["reason"]

    slow = rollout(max_p99_ratio=3.0, p99_slack_ms=0.0)
    for _ in range(10):
        slow.record("serving", 1, False, 0.010)
    for latency in (0.030, 0.010, 0.010, 0.010, 0.010):
        slow.record("canary", 2, False, latency)
    assert slow.verdict(1, 2) is None  # 5 outcomes: a p99 would be their maximum
    for _ in range(5):
        slow.record("canary", 2, False, 0.010)
    assert slow.verdict(1, 2) is None  # full; p99 30 ms = 3.0x: at the margin, not over
    slow.record("canary", 2, False, 0.031)  # the window slides: 0.030 out, 0.031 in
    assert "3.1x" in slow.verdict(1, 2)["reason"]
    # The window slides: ten fast answers later the slow ones are gone.
    for _ in range(10):
        slow.record("canary", 2, False, 0.010)
    assert slow.verdict(1, 2) is None
    # The slack: 31 ms against 10 ms is not over 3 x 10 + 20.
    slack = rollout(max_p99_ratio=3.0, p99_slack_ms=20.0)
    for _ in range(10):
        slack.record("serving", 1, False, 0.010)
    for latency in (0.011, 0.012, 0.029, 0.031, 0.049, 0.01, 0.01, 0.01, 0.01, 0.01):
        slack.record("canary", 2, False, latency)
    assert slack.verdict(1, 2) is None
    slack.record("canary", 2, False, 0.051)
    assert "+ 20 ms" in slack.verdict(1, 2)["reason"]

    gone = rollout()
    gone.rolled_back[2] = "earlier"
    assert not any(gone.takes_canary(2, None) for _ in range(100))
    assert gone.takes_canary(None, None) is False


def test_the_split_by_key_is_stable_and_even():
    draws = [unit_hash(f"movies\0u{i}") for i in range(10_000)]
    assert draws == [unit_hash(f"movies\0u{i}") for i in range(10_000)]
    assert abs(np.mean(np.array(draws) < 0.3) - 0.3) < 0.02
    keyed = rollout()
    assert len({keyed.takes_canary(2, "u7") for _ in range(50)}) == 1


def test_canary_shares_are_checked_when_the_app_is_built(tmp_path, capsys):
    registry = ModelRegistry(str(tmp_path / "store"))
    register_policy(registry, seed=1)
    registry.promote("cartpole", 1)
    for fraction, message in (
        ({"cartpole": 1.5}, "expected a share in"),
        ({"nope": 0.1}, "not a served model"),
        ({"cartpole": "half"}, "expected a number"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_app({"store_uri": registry.uri, "canary_fraction": fraction})
    with pytest.raises(ConfigError, match="its canary takes a copy of every request or a share"):
        build_app(
            {
                "store_uri": registry.uri,
                "canary_fraction": {"cartpole": 0.1},
                "shadow": ["cartpole"],
            }
        )
    # On the command line: exit 2 before Ray starts.
    serve_cmd = ["serve", "--store", registry.uri, "--canary-fraction"]
    for bad in ("cartpole", "cartpole=2", "=0.1", "cartpole=x"):
        with pytest.raises(SystemExit) as exited:
            cli.main([*serve_cmd, bad])
        assert exited.value.code == 2 and "--canary-fraction" in capsys.readouterr().err, bad
    assert cli.main([*serve_cmd, "nope=0.1"]) == 2
    assert "not a served model" in capsys.readouterr().err


def noisy_pngs(levels, size: int, seed: int) -> tuple[list, list[str]]:
    """Grey pictures around each level (noise 0.1): PIL images and their PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, files = [], []
    for level in levels:
        grey = np.clip(level + rng.normal(0, 0.1, size=(size, size, 1)), 0, 1)
        image = Image.fromarray((np.repeat(grey, 3, axis=2) * 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(image)
        files.append(base64.b64encode(buffer.getvalue()).decode())
    return images, files


def test_image_drift_names_brightness_and_size_for_classifiers_and_segmenters(tmp_path):
    """The vision family's profile (brightness, contrast, size; the class prior): images
    like the training ones stay under 0.1; darker, larger ones drift on those features."""
    from rayline.vision.predictors import ImageClassifierService, SegmenterService, image_profile
    from test_serving import classifier_files, segmenter_files

    rng = np.random.default_rng(0)
    reference, _ = noisy_pngs(rng.uniform(0.3, 0.7, 500), 32, seed=1)
    profile = image_profile(reference, rng.integers(0, 3, 500).tolist(), 3)
    registry = ModelRegistry(str(tmp_path / "store"))
    for name, files, kind in (
        ("shapes", classifier_files(), "image_classifier"),
        ("scenes", segmenter_files(), "segmenter"),
    ):
        files = {**files, "profile.json": json.dumps(profile).encode()}
        registry.register(name, files, kind=kind, metrics={})
    classifier = ImageClassifierService(registry, "shapes", 1)
    _, alike = noisy_pngs(rng.uniform(0.3, 0.7, 1000), 32, seed=2)
    for batch in range(0, 1000, 50):  # MAX_IMAGES (64) a request
        classifier.predict(alike[batch : batch + 50], 1)
    calm = classifier.drift.report()
    assert calm["window"] == 1000, calm
    assert max(calm["features"].values()) < 0.1, calm
    _, darker = noisy_pngs(np.full(1000, 0.1), 48, seed=3)
    for batch in range(0, 1000, 50):
        classifier.predict(darker[batch : batch + 50], 1)
    moved = classifier.drift.report()
    assert moved["features"]["brightness"] > 0.25 and moved["features"]["width"] > 0.25, moved
    assert moved["drifted"]
    segmenter = SegmenterService(registry, "scenes", 1)
    segmenter.predict(darker[:50])
    dark = segmenter.drift.report(min_rows=50)  # the features' values, not a verdict
    assert dark["window"] == 50 and dark["features"]["brightness"] > 0.25, dark
    # The untrained FCN calls every pixel class 0: its answers' prior moved too.
    assert dark["outputs_psi"] > 0.25, dark


def test_the_loop_lag_probe_records_how_long_the_loop_was_held():
    """A loop held 300 ms by a blocking call: the probe's next wake is about that late,
    the wakes around it barely (rayline.serving.metrics.LoopLag)."""
    recorder = Recorder()

    async def held_once() -> None:
        probe = asyncio.get_running_loop().create_task(LoopLag(recorder).run(probe_s=0.02))
        await asyncio.sleep(0.2)
        time.sleep(0.3)  # a blocking call on the loop
        await asyncio.sleep(0.2)
        probe.cancel()

    asyncio.run(held_once())
    ((_, tags), lags), *others = recorder.observed.items()
    assert not others and dict(tags)["deployment"] == ""  # outside Serve: named by pid
    assert len(lags) >= 10
    assert 250 <= max(lags) <= 400, lags
    assert sorted(lags)[len(lags) // 2] < 20  # the other wakes were about on time
