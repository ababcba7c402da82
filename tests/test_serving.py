"""The Serve application over real HTTP on localhost, with real registered models."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from PIL import Image
from ray import serve
from schemathesis.checks import not_a_server_error

import oracles
from rayline.boosting.data import Table, infer_task
from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
from rayline.config import ConfigError, from_dict
from rayline.recsys.data import from_arrays, synthetic_ratings
from rayline.recsys.knn import UserKNN
from rayline.rl.networks import NetworkSpec, build_q_network
from rayline.rl.predictor import DQNPolicy
from rayline.serving.app import build_app, with_serving_env
from rayline.serving.base import BadInput
from rayline.serving.replays import table_directory
from rayline.serving.settings import API_KEY_ENV, ServeArgs
from rayline.store import ModelRegistry
from rayline.vision import fcn, transfer

PORT = 18125
URL = f"http://127.0.0.1:{PORT}"
SPEC = NetworkSpec([4], 2, [16], dueling=False)


def register_policy(registry, seed, name="cartpole"):
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(build_q_network(SPEC).state_dict(), buffer)
    files = {"policy.pt": buffer.getvalue(), "network.json": json.dumps(SPEC.__dict__).encode()}
    return registry.register(name, files, kind="dqn", metrics={"eval_return_mean": 500.0})


def boosted_model():
    """A small binary XGBoost model on features a, b, c (c matters most)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 3)).astype(np.float32)
    label = (features[:, 2] + 0.3 * features[:, 0] > 0).astype(np.int64)
    table = Table(features, label, ["a", "b", "c"], ["q", "q", "q"], {})
    train, valid = table.subset(np.arange(240)), table.subset(np.arange(240, 300))
    task = infer_task(train.label)
    params = booster_params(TreeParams(max_depth=3), task, threads=1, seed=0)
    return fit(
        params, task, train.dmatrix(), valid.dmatrix(), rounds=20, tracker=BestRound(task, 0)
    )


SHAPES = ["circle", "square", "triangle"]


def classifier_files():
    """An untrained 3-class mobilenet_v3_small on 32-pixel images, as the transfer
    pipeline saves one."""
    torch.manual_seed(0)
    model, _ = transfer.build_model("mobilenet_v3_small", len(SHAPES), "none")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    meta = {"arch": "mobilenet_v3_small", "classes": SHAPES, "crop_size": 32, "resize_size": 32}
    return {"best.pt": buffer.getvalue(), "model.json": json.dumps(meta).encode()}


def segmenter_files():
    """An untrained FCN-32s: its zero-initialised scores call every pixel class 0."""
    buffer = io.BytesIO()
    torch.save(fcn.FCN("resnet18", 3, "fcn32s").state_dict(), buffer)
    meta = {"arch": "resnet18", "variant": "fcn32s", "classes": ["background", *SHAPES[:2]]}
    return {"best.pt": buffer.getvalue(), "model.json": json.dumps(meta).encode()}


def png(colour, size=40, height=None, format="PNG") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, height or size), colour).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_png(width: int, height: int) -> str:
    """A tiny PNG whose header promises width x height pixels: a blank image compresses
    to a few hundred bytes for millions of pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    registry = ModelRegistry(store)
    register_policy(registry, seed=1)
    register_policy(registry, seed=2)
    registry.promote("cartpole", 1)
    data, _ = synthetic_ratings(30, 20, seed=0)
    named = from_arrays(
        np.array([f"u{u}" for u in data.users]),
        np.array([f"m{i}" for i in data.items]),
        data.ratings,
    )
    model = UserKNN(similarity="cosine", k=5, shrinkage=0).fit(named)
    registry.register("movies", model.save(), kind="recommender", metrics={"ndcg@10": 0.3})
    registry.promote("movies", 1)
    registry.register("risk", boosted_model().files(), kind="xgboost", metrics={"valid_loss": 0.2})
    registry.promote("risk", 1)
    registry.register("shapes", classifier_files(), kind="image_classifier", metrics={})
    registry.promote("shapes", 1)
    registry.register("scenes", segmenter_files(), kind="segmenter", metrics={})
    registry.promote("scenes", 1)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app({"store_uri": store, "poll_s": 0.2}), name="rayline", route_prefix="/")
    with httpx.Client(base_url=URL, timeout=30) as client:
        yield registry, client
    serve.shutdown()


def test_health_models_and_openapi(served):
    _, client = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}  # its models are loaded
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["cartpole"]["kind"] == "dqn" and models["cartpole"]["version"] == 1
    assert models["movies"]["kind"] == "recommender"
    assert models["risk"]["kind"] == "xgboost"
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/dqn/{model}/act",
        "/xgboost/{model}/predict",
        "/recommend/{user_id}",
        "/recommend",
        "/items/{item_id}/similar",
        "/vision/{model}/classify",
        "/vision/{model}/segment",
    } <= set(paths)


def test_dqn_act_matches_the_registered_policy(served):
    registry, client = served
    files = registry.read_files(registry.get("cartpole", "production"))
    observations = [[0.01, -0.2, 0.03, 0.1], [0.5, 0.5, -0.1, -0.4]]
    expected = oracles.dqn_q_values(files, observations)
    # the oracle multiplies in another order than the served network (last bits differ):
    # these observations' two Q-values are far apart, so the greedy action cannot flip
    assert np.abs(expected[:, 0] - expected[:, 1]).min() > 1e-3, expected
    batch = client.post("/dqn/cartpole/act", json={"observations": observations})
    assert batch.status_code == 200
    assert batch.json()["actions"] == expected.argmax(axis=1).tolist()
    assert np.allclose(batch.json()["q_values"], expected, atol=1e-5)
    single = client.post("/dqn/cartpole/act", json={"observations": observations[0]}).json()
    assert single["actions"] == expected.argmax(axis=1).tolist()[:1] and single["version"] == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/dqn/cartpole/act", {"observations": [1, 2, 3]}, 400, "expected shape [4]"),
        (
            "/dqn/cartpole/act",
            {"observations": [[1, 2], [3, 4, 5, 6]]},
            400,
            "nested lists of equal length",
        ),
        ("/dqn/cartpole/act", {"observations": ["a", "b", "c", "d"]}, 400, "expected a number"),
        ("/dqn/cartpole/act", {"observations": ["1", "2", "3", "4"]}, 400, "got a string"),
        ("/dqn/cartpole/act", {"observations": [True, False, True, False]}, 400, "got true"),
        ("/dqn/cartpole/act", {"observations": [10**400, 0, 0, 0]}, 400, "float32's range"),
        ("/dqn/cartpole/act", {"observations": [0, 1e300, 0, 0]}, 400, "float32's range"),
        ("/dqn/cartpole/act", {"observations": [[0, 0, 0, None]]}, 400, "got null"),
        ("/dqn/cartpole/act", {"observations": []}, 422, "observations"),
        ("/dqn/cartpole/act", {"obs": [1, 2, 3, 4]}, 422, "observations"),
        ("/dqn/nosuch/act", {"observations": [1, 2, 3, 4]}, 404, "no DQN policy 'nosuch'"),
        ("/recommend", {"ratings": {"nope": 5}}, 400, "none of the rated items is known"),
        ("/xgboost/risk/predict", {"rows": [{"a": 1, "b": 2}]}, 400, "missing feature 'c'"),
        (
            "/xgboost/risk/predict",
            {"rows": [{"a": 1, "b": 2, "c": 3, "d": 4}]},
            400,
            "unknown feature 'd'",
        ),
        (
            "/xgboost/risk/predict",
            {"rows": [{"a": "x", "b": 2, "c": 3}]},
            400,
            "expected a number",
        ),
        ("/xgboost/risk/predict", {"rows": [{"a": 1e300, "b": 2, "c": 3}]}, 400, "float32"),
        ("/xgboost/risk/predict", {"rows": [{"a": -1e39, "b": 2, "c": 3}]}, 400, "float32"),
        ("/xgboost/risk/predict", {"rows": [{"a": 10**401, "b": 2, "c": 3}]}, 400, "digits"),
        ("/xgboost/risk/predict", {"rows": [{"a": True, "b": 2, "c": 3}]}, 400, "got true"),
        ("/xgboost/risk/predict", {"rows": []}, 422, "rows"),
        ("/xgboost/risk/predict", {"row": {"a": 1}}, 422, "rows"),
        ("/xgboost/cartpole/predict", {"rows": [{"a": 1}]}, 404, "no XGBoost model 'cartpole'"),
        ("/recommend", {"ratings": {"m1": 5}, "k": 0}, 422, "k"),
        ("/recommend", {"ratings": "m1"}, 422, "ratings"),
        ("/recommend", {"ratings": {}}, 422, "ratings"),
        ("/recommend", {"ratings": {"m1": "5"}}, 422, "valid number"),
        ("/recommend", {"ratings": {"m1": True}}, 422, "valid number"),
        ("/recommend", {"ratings": {"m1": 1e300}}, 422, "less than or equal"),
        ("/recommend", {"ratings": {"m1": 10**400}}, 422, "ratings"),
        ("/vision/shapes/classify", {"images": ["%%%"]}, 400, "images[0]: not valid base64"),
        ("/vision/shapes/classify", {"images": ["aGVsbG8="]}, 400, "images[0]: not an image"),
        ("/vision/shapes/classify", {"images": []}, 422, "images"),
        ("/vision/scenes/segment", {"images": []}, 422, "images"),
        ("/vision/shapes/classify", {"images": [png("red")], "k": 0}, 422, "k"),
        ("/vision/risk/classify", {"images": [png("red")]}, 404, "no image classifier 'risk'"),
        ("/vision/scenes/segment", {"images": ["%%%"]}, 400, "images[0]: not valid base64"),
        ("/vision/shapes/segment", {"images": [png("red")]}, 404, "no segmentation model"),
        # Counted before anything is decoded or computed: each over-limit request gets
        # 413 (or the schema's 422) naming the limit.
        ("/dqn/cartpole/act", {"observations": [[0, 0, 0, 0]] * 1025}, 422, "1024"),
        ("/xgboost/risk/predict", {"rows": [{"a": 1, "b": 2, "c": 3}] * 10_001}, 422, "10000"),
        ("/recommend", {"ratings": {f"m{i}": 3 for i in range(10_001)}}, 422, "10000"),
        ("/vision/shapes/classify", {"images": [png("red", 4)] * 65}, 422, "64"),
        ("/vision/scenes/segment", {"images": [png("red", 4)] * 65}, 422, "64"),
        ("/vision/shapes/classify", {"images": [png("red", 1, 2000)]}, 413, "16 times"),
        ("/vision/scenes/segment", {"images": [png("red", 2000, 1)]}, 413, "16 times"),
        ("/vision/shapes/classify", {"images": [bomb_png(5000, 5000)]}, 413, "16,777,216"),
        ("/vision/scenes/segment", {"images": [bomb_png(4097, 4096)]}, 413, "16,777,216"),
        # The segmenter computes at full resolution: a smaller budget.
        ("/vision/scenes/segment", {"images": [bomb_png(1025, 1024)]}, 413, "1,048,576"),
        (
            "/vision/shapes/classify",
            {"images": [bomb_png(3000, 3000), bomb_png(3000, 3000)]},
            413,
            "images[0..1]: 18,000,000 pixels together",
        ),
        (
            "/vision/shapes/classify",
            {"images": [png("red", format="GIF")]},
            400,
            "GIF files are not accepted",
        ),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem(served, path, body, status, message):
    _, client = served
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    assert client.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]}).status_code == 200


def test_xgboost_predictions_match_the_registered_model(served):
    registry, client = served
    version = registry.get("risk", "production")
    rows = [{"a": 0.1, "b": -1.0, "c": 2.0}, {"a": 0.0, "b": None, "c": -2.0}]
    answer = client.post("/xgboost/risk/predict", json={"rows": rows})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = oracles.xgboost_probabilities(registry.read_files(version), rows)
    assert body["task"] == "binary" and body["version"] == 1
    assert np.allclose(body["probabilities"], expected, atol=1e-6)
    assert body["predictions"] == [1, 0]  # c decides: positive, then negative


def solid_image_probabilities(files: dict, colour) -> np.ndarray:
    """The classifier's class probabilities for a one-colour image, by torchvision's own
    model on the stored weights: resizing and cropping leave such an image one colour,
    so its input is that colour scaled to [0, 1] and normalised by ImageNet's statistics."""
    import torchvision

    meta = json.loads(files["model.json"])
    model = torchvision.models.get_model(meta["arch"], weights=None, num_classes=3).eval()
    model.load_state_dict(torch.load(io.BytesIO(files["best.pt"]), weights_only=True))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixel = (torch.tensor(colour, dtype=torch.float32) / 255 - mean) / std
    size = meta["crop_size"]
    batch = pixel.view(1, 3, 1, 1).expand(1, 3, size, size)
    with torch.no_grad():
        return torch.softmax(model(batch), dim=1)[0].numpy()


def test_image_classes_match_the_registered_model(served):
    registry, client = served
    files = registry.read_files(registry.get("shapes", "production"))
    colours = [(255, 0, 0), (0, 90, 200)]
    images = [png(colours[0]), png(colours[1], size=64)]
    answer = client.post("/vision/shapes/classify", json={"images": images, "k": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["version"] == 1 and len(body["predictions"]) == 2
    for got, colour in zip(body["predictions"], colours):
        probabilities = solid_image_probabilities(files, colour)
        top = np.argsort(-probabilities, kind="stable")[:2]
        # no near tie among the first three, so the served order cannot flip on rounding
        assert np.abs(np.diff(np.sort(probabilities)[::-1][:3])).min() > 1e-4, probabilities
        assert [c["class"] for c in got] == [SHAPES[i] for i in top]
        assert [c["probability"] for c in got] == pytest.approx(probabilities[top], abs=1e-5)
    everything = client.post("/vision/shapes/classify", json={"images": images[:1], "k": 10})
    top = everything.json()["predictions"][0]
    assert sorted(c["class"] for c in top) == SHAPES  # k beyond the classes: every class
    assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)


def test_segmentation_masks_cover_every_pixel(served):
    _, client = served
    answer = client.post("/vision/scenes/segment", json={"images": [png("red", size=45)]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["classes"] == ["background", "circle", "square"]
    (segmented,) = body["predictions"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(segmented["mask_png"]))))
    assert mask.shape == (45, 45) and (segmented["width"], segmented["height"]) == (45, 45)
    # the untrained FCN's known answer: every pixel background
    assert not mask.any() and segmented["pixels"] == {
        "background": 1.0,
        "circle": 0.0,
        "square": 0.0,
    }


def test_non_finite_and_non_json_and_oversized_bodies(served):
    _, client = served
    nan = client.post(
        "/dqn/cartpole/act",
        content=b'{"observations": [NaN, 0, 0, 0]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400 and "NaN or infinite" in nan.text
    garbage = client.post(
        "/dqn/cartpole/act", content=b"not json", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 422
    huge = client.post(
        "/dqn/cartpole/act",
        content=b"[" + b"0," * (1 << 20) + b"0]",
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    nan_rating = client.post(
        "/recommend",
        content=b'{"ratings": {"m1": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert nan_rating.status_code == 422 and "finite" in nan_rating.text
    assert client.get("/recommend/u1", params={"k": 0}).status_code == 422
    assert client.get("/items/zzz/similar").status_code == 404


@pytest.mark.parametrize("megabytes", [10, 100])
def test_chunked_bodies_over_the_limit_get_413_as_they_arrive(served, megabytes):
    """No Content-Length to trust: the limit is counted while the body is read, so the
    replica never holds the whole body."""
    _, client = served
    sent = {"bytes": 0}

    def chunks():
        yield b'{"observations": ['
        piece = b"0," * (1 << 16)
        while sent["bytes"] < megabytes << 20:
            sent["bytes"] += len(piece)
            yield piece
        yield b"0]}"

    try:
        response = client.post(
            "/dqn/cartpole/act", content=chunks(), headers={"content-type": "application/json"}
        )
    except httpx.HTTPError:  # the server may close the connection while we still send
        response = None
    if response is not None:
        assert response.status_code == 413, response.text[:200]
        assert "over" in response.text
    assert client.get("/healthz").status_code == 200
    ok = client.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]})
    assert ok.status_code == 200


def test_openapi_documents_every_error(served):
    _, client = served
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (
        ("/dqn/{model}/act", "post"),
        ("/xgboost/{model}/predict", "post"),
        ("/recommend", "post"),
        ("/recommend/{user_id}", "get"),
        ("/vision/{model}/classify", "post"),
    ):
        responses = paths[path][method]["responses"]
        assert {"200", "400", "401", "404", "413", "422", "504"} <= set(responses), path
        assert "schema" in responses["400"]["content"]["application/json"]
    act = paths["/dqn/{model}/act"]["post"]["requestBody"]["content"]["application/json"]
    assert act["schema"]["$ref"].endswith("ActRequest")


def test_a_tampered_version_is_refused_and_the_previous_one_keeps_answering(served):
    registry, client = served
    observation = {"observations": [0.1, 0.2, 0.3, 0.4]}
    serving = client.post("/dqn/cartpole/act", json=observation).json()["version"]
    tampered = register_policy(registry, seed=3)
    path = Path(registry.uri) / "models" / "cartpole" / str(tampered.version) / "policy.pt"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # one byte changed
    path.write_bytes(bytes(blob))
    registry.promote("cartpole", tampered.version)
    statuses, deadline = [], time.monotonic() + 10
    refused = []
    while time.monotonic() < deadline and not refused:
        response = client.post("/dqn/cartpole/act", json=observation)
        statuses.append(response.status_code)
        assert response.json()["version"] == serving
        refused = [r for r in client.get("/models").json()["refused"] if r["name"] == "cartpole"]
    assert set(statuses) == {200}
    assert refused[0]["version"] == tampered.version and "hash" in refused[0]["reason"]
    registry.promote("cartpole", serving)  # put it back for the other tests


@pytest.mark.slow
def test_a_corrupt_model_at_start_does_not_hide_the_others(served, tmp_path):
    registry, _ = served
    store = tmp_path / "store"
    other = ModelRegistry(str(store))
    good = register_policy(other, seed=1)
    other.promote("cartpole", good.version)
    other.register("broken", {"policy.pt": b"x", "network.json": b"{}"}, kind="dqn")
    other.promote("broken", 1)
    files = other.read_files(good)  # a whole policy, then one byte of it changed
    bad = other.register("tampered", files, kind="dqn")
    other.promote("tampered", 1)
    (store / "models" / "broken" / "1" / "metadata.json").write_text("{corrupt")
    blob = bytearray(files["policy.pt"])
    blob[-1] ^= 0xFF
    (store / "models" / "tampered" / "1" / "policy.pt").write_bytes(bytes(blob))
    serve.run(build_app({"store_uri": str(store)}), name="partial", route_prefix="/partial")
    try:
        with httpx.Client(base_url=f"{URL}/partial", timeout=30) as partial:
            act = partial.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]})
            assert act.status_code == 200
            listed = partial.get("/models").json()
            assert [m["name"] for m in listed["models"]] == ["cartpole"]
            reasons = {r["name"]: r["reason"] for r in listed["refused"]}
            assert "corrupted metadata.json" in reasons["broken"]
            assert "hash" in reasons["tampered"] and bad.version == 1
            missing = partial.post("/dqn/tampered/act", json={"observations": [0, 0, 0, 0]})
            assert missing.status_code == 404 and "not served" in missing.text
            # The answers say which model and why, never where the store lives.
            assert "<store>/models/broken/1/metadata.json" in reasons["broken"]
            assert str(store) not in partial.get("/models").text and str(store) not in missing.text
    finally:
        serve.delete("partial")


def test_recommendations_with_explanations_cold_start_and_fold_in(served):
    registry, client = served
    known = client.get("/recommend/u3", params={"k": 5}).json()
    assert not known["cold_start"] and len(known["items"]) == 5
    scores = [item["score"] for item in known["items"]]
    assert scores == sorted(scores, reverse=True)
    expected = oracles.user_knn_scores(registry.read_files(registry.get("movies", 1)), "u3")
    assert scores == pytest.approx(sorted(expected.values(), reverse=True)[:5])
    for item in known["items"]:  # each served item has the score numpy gives it
        assert item["score"] == pytest.approx(expected[item["item_id"]])
    assert all(item["because"] for item in known["items"])  # similar users who rated it
    assert all(
        len(item["because"]) <= 3 and item["similar_users_who_rated"] >= len(item["because"])
        for item in known["items"]
    )
    sims = [r["similarity"] for r in known["items"][0]["because"]]
    assert sims == sorted(sims, reverse=True)  # the most similar are named
    assert all(r["user_id"].startswith("u") for item in known["items"] for r in item["because"])
    cold = client.get("/recommend/stranger").json()
    assert cold["cold_start"] and len(cold["items"]) == 10
    fresh = client.post(
        "/recommend", json={"ratings": {"m1": 5, "m2": 4, "ghost": 3}, "k": 4}
    ).json()
    assert len(fresh["items"]) == 4 and fresh["unknown_items"] == ["ghost"]
    assert not {"m1", "m2"} & {item["item_id"] for item in fresh["items"]}
    similar = client.get("/items/m3/similar", params={"k": 3}).json()
    assert len(similar["items"]) == 3 and "m3" not in [i["item_id"] for i in similar["items"]]


def test_promotion_changes_answers_without_failed_requests(served):
    registry, client = served
    observation = {"observations": [0.1, 0.2, 0.3, 0.4]}
    before = client.post("/dqn/cartpole/act", json=observation).json()
    assert before["version"] == 1
    registry.promote("cartpole", 2)
    statuses, versions = [], set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = client.post("/dqn/cartpole/act", json=observation)
        statuses.append(response.status_code)
        versions.add(response.json()["version"])
        if 2 in versions:
            break
    assert set(statuses) == {200} and 2 in versions
    after = client.post("/dqn/cartpole/act", json=observation).json()
    expected = oracles.dqn_q_values(
        registry.read_files(registry.get("cartpole", 2)), [observation["observations"]]
    )
    assert np.allclose(after["q_values"], expected, atol=1e-5)
    assert not np.allclose(after["q_values"], before["q_values"])


@pytest.mark.slow
def test_api_key_when_configured(served, monkeypatch):
    registry, _ = served
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    app = build_app(
        {"store_uri": registry.uri, "models": ["cartpole"]}
    )  # loads less: starts sooner
    serve.run(app, name="secured", route_prefix="/secured")
    with httpx.Client(base_url=f"{URL}/secured", timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200  # probes need no key
        assert client.get("/models").status_code == 401
        assert client.get("/models", headers={"x-api-key": "wrong"}).status_code == 401
        assert client.get("/models", headers={"x-api-key": "s3cret"}).status_code == 200
    serve.delete("secured")


@pytest.mark.slow
def test_the_api_key_from_a_file_never_reaches_a_log(served, tmp_path, monkeypatch):
    import ray

    registry, _ = served
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    secret = "k-" + os.urandom(16).hex()
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    app = build_app(
        {"store_uri": registry.uri, "models": ["cartpole"], "api_key_file": str(key_file)}
    )
    serve.run(app, name="keyed", route_prefix="/keyed")
    with httpx.Client(base_url=f"{URL}/keyed", timeout=30) as client:
        assert client.get("/models").status_code == 401
        assert client.get("/models", headers={"x-api-key": secret}).status_code == 200
    serve.delete("keyed")
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    leaked = [
        str(path)
        for path in session.rglob("*")
        if path.is_file()
        and path.stat().st_size < 50 << 20
        and secret.encode() in path.read_bytes()
    ]
    assert not leaked, leaked
    # fail closed: a key file that cannot be read is an error, never an open app
    with pytest.raises(ConfigError, match="cannot be read"):
        build_app({"store_uri": registry.uri, "api_key_file": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        build_app({"store_uri": registry.uri, "api_key_file": str(tmp_path / "empty")})


@pytest.mark.slow
def test_a_request_past_its_timeout_gets_504_and_serving_goes_on(served):
    registry, client = served
    serve.run(
        build_app(
            {
                "store_uri": registry.uri,
                "models": ["cartpole"],  # what it asks: a replica that loads less starts sooner
                "request_timeout_s": 1e-6,
                "max_body_bytes": 100,
            }
        ),
        name="hasty",
        route_prefix="/hasty",
    )
    with httpx.Client(base_url=f"{URL}/hasty", timeout=30) as hasty:
        response = hasty.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]})
        assert response.status_code == 504 and "no answer within" in response.text
        big = hasty.post("/dqn/cartpole/act", json={"observations": [[0.0] * 4] * 20})
        assert big.status_code == 413 and "over 100 bytes" in big.text
        assert hasty.get("/healthz").status_code == 200
    serve.delete("hasty")
    assert client.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]}).status_code == 200


def test_a_request_a_crashed_replica_held_is_answered_502_not_computed(served):
    """What a gateway replica does with a replay from the front (rayline.serving.replays):
    here the crashed holder is a process that took the request's name in the host's
    table and died of SIGSEGV with it in hand."""
    _, client = served
    name = "4f1e2a9c-0b7d-4c3e-9a51-d2c86e0f7b13"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal\n"
            "from rayline.serving.replays import HeldRequests, request_name\n"
            f"HeldRequests({table_directory()!r}).take(request_name({name.encode()!r}))\n"
            "os.kill(os.getpid(), signal.SIGSEGV)\n",
        ]
    )
    assert holder.wait(timeout=60) == -signal.SIGSEGV
    body = {"observations": [0, 0, 0, 0]}
    replayed = client.post("/dqn/cartpole/act", json=body, headers={"X-Rayline-Request": name})
    assert replayed.status_code == 502
    assert f"crashed (process {holder.pid})" in replayed.json()["detail"]
    other = name.replace("4f1e", "5f1e")
    fresh = client.post("/dqn/cartpole/act", json=body, headers={"X-Rayline-Request": other})
    assert fresh.status_code == 200
    assert client.post("/dqn/cartpole/act", json=body).status_code == 200


@pytest.mark.slow
def test_unbatched_app_answers_the_same(served):
    registry, client = served
    serve.run(
        build_app({"store_uri": registry.uri, "models": ["cartpole", "movies"], "batching": False}),
        name="unbatched",
        route_prefix="/unbatched",
    )
    observation = {"observations": [0.1, -0.1, 0.2, 0.0]}
    with httpx.Client(base_url=f"{URL}/unbatched", timeout=30) as unbatched:
        for method, path, body in (
            ("POST", "/dqn/cartpole/act", observation),
            ("GET", "/recommend/u4?k=5", None),
        ):
            one = unbatched.request(method, path, json=body)
            other = client.request(method, path, json=body)
            assert one.status_code == other.status_code == 200
            assert one.json() == other.json()
    serve.delete("unbatched")


@pytest.mark.slow
def test_models_in_deployments_of_their_own_answer_the_same(served):
    """A vision model (and a DQN policy and a recommender) held by deployments of their
    own behind the same routes: the same answers, the same 4xx for bad input, listed by
    /models, and the gateway replica holds none of them."""
    registry, client = served
    held_apart = {"shapes": {"max_ongoing_requests": 8}, "cartpole": {}, "movies": {}}
    serve.run(
        build_app({"store_uri": registry.uri, "own_deployments": held_apart}),
        name="apart",
        route_prefix="/apart",
    )
    status = serve.status().applications["apart"].deployments
    assert {"ModelServer-shapes", "ModelServer-cartpole", "ModelServer-movies"} < set(status)
    images = {"images": [png((255, 0, 0)), png((0, 90, 200), size=64)], "k": 3}
    with httpx.Client(base_url=f"{URL}/apart", timeout=30) as apart:
        for method, path, body in (
            ("POST", "/vision/shapes/classify", images),
            ("POST", "/dqn/cartpole/act", {"observations": [[0.1, -0.1, 0.2, 0.0]] * 3}),
            ("GET", "/recommend/u4?k=5", None),
            ("GET", "/items/m3/similar?k=4", None),
            ("POST", "/xgboost/risk/predict", {"rows": [{"a": 0.1, "b": 0.2, "c": -1.0}]}),
        ):
            one = apart.request(method, path, json=body)
            other = client.request(method, path, json=body)
            assert one.status_code == other.status_code == 200, (path, one.text)
            assert one.json() == other.json(), path
        bad_image = apart.post("/vision/shapes/classify", json={"images": ["bm90IGFuIGltYWdl"]})
        assert bad_image.status_code == 400 and "0" in bad_image.json()["detail"]
        bad_shape = apart.post("/dqn/cartpole/act", json={"observations": [1.0, 2.0]})
        assert bad_shape.status_code == 400 and "shape" in bad_shape.json()["detail"]
        unknown_user = apart.get("/items/nope/similar")
        assert unknown_user.status_code == 404
        listed = {m["name"] for m in apart.get("/models").json()["models"]}
        assert {"shapes", "cartpole", "movies", "risk", "scenes"} <= listed
        # The Open Inference Protocol reaches them the same way.
        tensor = {"name": "observations", "shape": [3, 4], "datatype": "FP32"}
        infer = {"inputs": [{**tensor, "data": [[0.1, -0.1, 0.2, 0.0]] * 3}]}
        for path, body in (("/v2/models/cartpole", None), ("/v2/models/cartpole/infer", infer)):
            one = apart.request("POST" if body else "GET", path, json=body)
            other = client.request("POST" if body else "GET", path, json=body)
            assert one.status_code == other.status_code == 200, (path, one.text)
            assert one.json() == other.json(), path
    serve.delete("apart")


def test_own_deployments_are_checked_when_the_app_is_built(served):
    registry, _ = served
    with pytest.raises(ConfigError, match="own_deployments.shapes: unknown option"):
        build_app({"store_uri": registry.uri, "own_deployments": {"shapes": {"gpus": 1}}})
    with pytest.raises(ConfigError, match="own_deployments.nope: not a served model"):
        build_app({"store_uri": registry.uri, "own_deployments": {"nope": {}}})


def test_route_metrics_reach_prometheus(served):
    import ray

    _, client = served
    assert client.post("/dqn/cartpole/act", json={"observations": [0, 0, 0, 0]}).status_code == 200
    assert client.post("/dqn/nosuch/act", json={"observations": [0, 0, 0, 0]}).status_code == 404
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "requests": "ray_rayline_requests_total{",
        "errors": "ray_rayline_request_errors_total{",
        "latency": "ray_rayline_request_latency_ms_bucket{",
        "loop lag": "ray_rayline_event_loop_lag_ms_count{",
    }
    found: dict = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(found) < len(wanted):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for key, prefix in wanted.items():
            lines = [line for line in text.splitlines() if line.startswith(prefix)]
            # tagged by the route template, never the concrete path; the loop by replica
            mark = 'deployment="Gateway"' if key == "loop lag" else 'route="/dqn/{model}/act"'
            if any(mark in line for line in lines):
                found[key] = lines
        time.sleep(2)
    assert set(found) == set(wanted), sorted(found)
    assert any('status="404"' in line for line in found["errors"])
    assert not any('status="200"' in line for line in found["errors"])
    # ten probes a second, each observed: a replica up for seconds has counted dozens
    counts = [float(line.rsplit(" ", 1)[1]) for line in found["loop lag"]]
    assert max(counts) >= 20, found["loop lag"]


def test_plain_predictor_rejects_a_wrong_model_kind(served):
    registry, _ = served
    with pytest.raises(BadInput, match="not a DQN policy"):
        DQNPolicy(registry, "movies", "production")


def test_fuzzing_the_openapi_document_finds_no_server_error(served):
    """Schema-driven random requests, bounded per route: every answer is 2xx or 4xx."""
    schema = schemathesis.openapi.from_url(f"{URL}/openapi.json")
    statuses = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def no_server_error(case):
            response = case.call(base_url=URL, timeout=30)
            statuses.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        no_server_error()
    assert len(statuses) > 50 and max(statuses) < 500
    assert any(400 <= s < 500 for s in statuses) and any(s == 200 for s in statuses)


def test_deploy_configs_validate_and_agree():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    local = yaml.safe_load((deploy / "serve.yaml").read_text())
    service = yaml.safe_load((deploy / "kuberay" / "rayservice.yaml").read_text())
    on_k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, on_k8s):
        ServeDeploySchema.model_validate(config)
        assert config["applications"][0]["import_path"] == "rayline.serving.app:build_app"
        from_dict(ServeArgs, config["applications"][0]["args"])  # build_app's own schema
    assert local["http_options"]["host"] == "127.0.0.1"
    assert local["applications"][0]["deployments"] == on_k8s["applications"][0]["deployments"]


def test_no_route_or_dependency_runs_in_fastapis_thread_pool():
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread hop
    on every request, which halved the gateway's throughput once (docs/benchmarks.md).
    Every route the families declare, and the gateway's own, is `async def`, and so is
    every dependency under it."""
    import inspect

    from rayline.family import served_kinds
    from rayline.serving.gateway import core_router

    def plain_calls(dependant) -> list[str]:
        found = [] if inspect.iscoroutinefunction(dependant.call) else [dependant.call]
        for sub in dependant.dependencies:
            found += plain_calls(sub)
        return [getattr(call, "__qualname__", repr(call)) for call in found]

    routers = [core_router(), *(served.routes() for served in served_kinds().values())]
    routes = [route for router in routers for route in router.routes]
    assert len(routes) >= 10
    plain = {route.path: plain_calls(route.dependant) for route in routes}
    assert not {path: calls for path, calls in plain.items() if calls}


def test_the_serving_env_joins_a_replicas_runtime_env_and_the_users_values_win():
    assert with_serving_env({"num_cpus": 0}) == {
        "num_cpus": 0,
        "runtime_env": {
            "env_vars": {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}
        },
    }
    given = {"num_gpus": 1, "runtime_env": {"pip": ["x"], "env_vars": {"MALLOC_ARENA_MAX": "4"}}}
    assert with_serving_env(given)["runtime_env"] == {
        "pip": ["x"],
        "env_vars": {"MALLOC_ARENA_MAX": "4", "ARROW_DEFAULT_MEMORY_POOL": "system"},
    }
    assert given == {
        "num_gpus": 1,
        "runtime_env": {"pip": ["x"], "env_vars": {"MALLOC_ARENA_MAX": "4"}},
    }  # not changed in place


FRAGMENTED_ARENA = """
import threading
from rayline.memory import release_freed_memory

def private_mb():
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line and "-" not in line[:20])
    return (int(fields["Private_Dirty"].split()[0]) + int(fields["Private_Clean"].split()[0])) / 1024

def load_and_drop(kept):
    # A model's many small objects made in a worker thread (its own arena), one in 64
    # still in use after the swap: the freed ones lie between live ones.
    made = [bytes(1000) + bytes([i % 251]) for i in range(150_000)]
    kept.extend(made[::64])

kept = []
before = private_mb()
thread = threading.Thread(target=load_and_drop, args=(kept,))
thread.start(); thread.join()
freed = private_mb()
released = release_freed_memory()
print(round(freed - before, 1), round(freed - private_mb(), 1), released)
"""


def test_a_reload_gives_the_old_models_pages_back():
    """What a swapped-out model's objects held in a worker thread's arena goes back to the
    OS when the Following releases freed memory (without it, glibc keeps it: the soak's
    replicas grew at every reload)."""
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_ARENA], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    held_mb, given_back_mb, released = done.stdout.split()
    assert released == "True"
    assert float(held_mb) > 100  # ~150 MB made, 1/64 of it kept
    assert float(given_back_mb) > 0.8 * float(held_mb)
