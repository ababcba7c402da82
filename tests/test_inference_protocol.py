"""The Open Inference Protocol beside rayline's own routes, driven by the ecosystem's own
client (`tritonclient.http`) against the Serve app: health, metadata, infer for each kind
that speaks it with answers equal to its predictor's on the same inputs, a version named
(the canary's) or not, and the hostile paths (a wrong datatype, strings for numbers,
float32 overflow, more data than the shape says, binary tensors, no API key)."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from ray import serve
from tritonclient.utils import InferenceServerException

from rayline.boosting.predictor import BoostedService
from rayline.recsys.predictor import RecommenderService
from rayline.rl.predictor import DQNPolicy
from rayline.serving.app import build_app
from rayline.serving.base import BadInput
from rayline.serving.inference_protocol import parse_inputs, tensor_array
from rayline.store import ModelRegistry
from test_monitoring import boosted, recommender
from test_serving import classifier_files, png, register_policy, segmenter_files

PORT = 18171  # its own: test_serving.py serves on 18125, test_monitoring.py on 18131
KEY = "protocol-key-5d1e"


def keyed() -> dict:
    """The API key header, a new dict each call: tritonclient adds its own headers to the
    dict it is given."""
    return {"X-API-Key": KEY}


def test_a_tensor_is_counted_and_every_element_checked_before_it_is_used():
    nested = tensor_array("x", [[1, 2.5], [3, 4]], [2, 2], "FP32")
    flat = tensor_array("x", [1, 2.5, 3, 4], [2, 2], "FP32")
    assert nested.dtype == np.float32 and (nested == flat).all() and nested[0, 1] == 2.5
    assert tensor_array("u", ["a", "b"], [2], "BYTES").tolist() == ["a", "b"]
    refused = {
        "a string for a number": (["1", 2], [2], "FP32", "JSON numbers"),
        "a boolean for a number": ([True, 2], [2], "FP32", "JSON numbers"),
        "float32 overflow": ([1e300, 2], [2], "FP32", "finite FP32"),
        "a fraction for an integer": ([1.5, 2], [2], "INT64", "whole JSON numbers"),
        "an integer past its type": ([300, 2], [2], "UINT8", "outside UINT8"),
        "fewer elements than the shape": ([1, 2, 3], [2, 2], "FP32", "3 elements"),
        "more elements than the shape": ([[1, 2], [3, 4], [5, 6]], [2, 2], "FP32", "more elements"),
        "a number for a string": ([1], [1], "BYTES", "strings"),
    }
    for case, (data, shape, datatype, message) in refused.items():
        with pytest.raises(BadInput, match=message):
            tensor_array("x", data, shape, datatype)
            pytest.fail(case)
    # Past 64 numbers they are checked by numpy: the same refusals, the index named.
    many = [0.5] * 99
    for last, message in (
        (1e39, r"x\[99\]: 1e\+39"),
        (10**400, r"x\[99\]: 1000"),
        (True, "numbers"),
    ):
        with pytest.raises(BadInput, match=message):
            tensor_array("x", [*many, last], [100], "FP32")
    assert tensor_array("x", [*many, 3e38], [100], "FP32")[-1] == np.float32(3e38)
    body = {"inputs": [{"name": "x", "shape": [4_000_000, 2], "datatype": "FP32", "data": []}]}
    with pytest.raises(BadInput, match="over 4,194,304 elements"):  # counted, not read
        parse_inputs(json.dumps(body).encode(), {})
    for bad in (b"[1, NaN]", b'{"inputs": []}', b"not json", b"[]"):
        with pytest.raises(BadInput):
            parse_inputs(bad, {})
    # Triton's binary extension: raw tensors after the JSON, counted and checked as JSON's.
    header = {"name": "x", "shape": [2], "datatype": "FP32"}

    def binary(tensors: list, raw: bytes, length: int | None = None):
        text = json.dumps({"inputs": tensors}).encode()
        return parse_inputs(
            text + raw, {"inference-header-content-length": str(length or len(text))}
        )

    sized = [{**header, "parameters": {"binary_data_size": 8}}]
    _, arrays = binary(sized, np.array([1.5, -2], "<f4").tobytes())
    assert arrays["x"].tolist() == [1.5, -2.0]
    names = [
        {"name": "u", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}
    ]
    _, arrays = binary(names, b"\x02\x00\x00\x00u1\x01\x00\x00\x00z")
    assert arrays["u"].tolist() == ["u1", "z"]
    hostile = {
        "a NaN, which JSON cannot carry": (sized, np.array([np.nan, 1], "<f4").tobytes(), "finite"),
        "an infinity": (sized, np.array([np.inf, 1], "<f4").tobytes(), "finite"),
        "fewer bytes than the shape": (
            [{**header, "parameters": {"binary_data_size": 4}}],
            b"\0" * 4,
            "4 bytes",
        ),
        "a size past the body": (sized, b"\0" * 4, "bytes left"),
        "bytes no input claims": (sized, b"\0" * 12, "4 bytes no input"),
        "a BYTES length past its tensor": (
            [{**names[0], "parameters": {"binary_data_size": 6}}],
            b"\xff\x00\x00\x00u1",
            "runs past",
        ),
    }
    for case, (tensors, raw, message) in hostile.items():
        with pytest.raises(BadInput, match=message):
            binary(tensors, raw)
            pytest.fail(case)
    with pytest.raises(BadInput, match="is not the length"):
        parse_inputs(b"{}", {"inference-header-content-length": "10"})


def test_xgboost_metadata_names_the_features_and_the_categories_a_client_sends(tmp_path):
    """The metadata says how to fill `features`: its columns' names, and a categorical
    column's categories, whose indexes are what the tensor carries. Filled that way, the
    tensor gets the answers rows of named values get."""
    from rayline.boosting.data import Table, infer_task
    from rayline.boosting.train import BestRound, TreeParams, booster_params, fit

    rng = np.random.default_rng(3)
    colour = rng.integers(0, 3, size=300)  # blue, green, red
    x = np.stack([rng.normal(size=300), colour], axis=1).astype(np.float32)
    label = ((colour == 2) ^ (x[:, 0] > 0.5)).astype(np.int64)
    table = Table(x, label, ["size", "colour"], ["q", "c"], {"colour": ["blue", "green", "red"]})
    task = infer_task(label)
    params = booster_params(TreeParams(max_depth=3), task, threads=1, seed=0)
    data = table.dmatrix()
    tracker = BestRound(task, 0)
    model = fit(params, task, data, data, rounds=10, tracker=tracker, categories=table.categories)
    registry = ModelRegistry(str(tmp_path))
    registry.register("paint", model.files(), kind="xgboost")
    service = BoostedService(registry, "paint", 1)
    (features,), _ = service.tensors()
    described = features.metadata()
    assert described["parameters"] == {
        "feature_names": ["size", "colour"],
        "categories": {"colour": ["blue", "green", "red"]},
    }
    rows = [{"size": 1.0, "colour": c} for c in ("blue", "green", "red")]
    names, categories = described["parameters"].values()
    tensor = np.array(
        [
            [row[n] if n not in categories else categories[n].index(row[n]) for n in names]
            for row in rows
        ],
        dtype=np.float32,
    )
    answers = service.predict(rows)
    assert service.predict_features(tensor) == answers
    assert len(set(answers["predictions"])) == 2  # the colour decides: the indexes matter


@pytest.fixture(scope="module")
def client(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    registry = ModelRegistry(store)
    register_policy(registry, seed=1)
    register_policy(registry, seed=2)
    registry.promote("cartpole", 1)
    registry.promote("cartpole", 2, "canary")
    registry.register("risk", boosted(["a", "b", "c"]).files(), kind="xgboost")
    registry.promote("risk", 1)
    registry.register("movies", recommender(5), kind="recommender")
    registry.promote("movies", 1)
    registry.register("shapes", classifier_files(), kind="image_classifier")
    registry.promote("shapes", 1)
    registry.register("scenes", segmenter_files(), kind="segmenter")
    registry.promote("scenes", 1)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    import hashlib

    args = {
        "store_uri": store,
        "poll_s": 0.2,
        "canary_fraction": {"cartpole": 0.5},
        "api_key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
    }
    serve.run(build_app(args), name="rayline", route_prefix="/")
    client = triton.InferenceServerClient(f"127.0.0.1:{PORT}")
    yield registry, client
    client.close()
    serve.shutdown()


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=False)
    return tensor


def _text(value) -> str:
    """A BYTES element as tritonclient gives it back (str from JSON, bytes from binary)."""
    return value.decode() if isinstance(value, bytes) else value


def _outputs(*names: str) -> list:
    return [triton.InferRequestedOutput(name, binary_data=False) for name in names]


def test_tritonclient_finds_the_server_and_each_models_tensors(client):
    registry, triton_client = client
    assert triton_client.is_server_live(headers=keyed())
    assert triton_client.is_server_ready(headers=keyed())
    assert triton_client.get_server_metadata(headers=keyed())["name"] == "rayline"
    assert triton_client.is_model_ready("cartpole", headers=keyed())
    assert triton_client.is_model_ready("cartpole", "2", headers=keyed())  # the canary
    assert not triton_client.is_model_ready("cartpole", "3", headers=keyed())
    metadata = triton_client.get_model_metadata("cartpole", headers=keyed())
    assert metadata["versions"] == ["1", "2"] and metadata["platform"] == "rayline_dqn"
    assert metadata["inputs"] == [{"name": "observations", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [
        {"name": "actions", "datatype": "INT64", "shape": [-1]},
        {"name": "q_values", "datatype": "FP32", "shape": [-1, 2]},
    ]
    risk = triton_client.get_model_metadata("risk", headers=keyed())
    # The features' names in the order of the last axis: what a client needs to fill it.
    assert risk["inputs"] == [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [-1, 3],
            "parameters": {"feature_names": ["a", "b", "c"]},
        }
    ]
    assert [o["name"] for o in risk["outputs"]] == ["predictions", "probabilities"]
    movies = triton_client.get_model_metadata("movies", headers=keyed())
    assert movies["inputs"] == [{"name": "user_ids", "datatype": "BYTES", "shape": [-1]}]
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        triton_client.get_model_metadata("nope", headers=keyed())
    with pytest.raises(InferenceServerException, match="X-API-Key"):
        triton_client.get_model_metadata("cartpole")


def test_tritonclient_infers_each_kind_with_its_predictors_answers(client):
    registry, triton_client = client
    observations = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    for version in (1, 2):  # named: the serving version and the canary
        answer = triton_client.infer(
            "cartpole",
            [_input("observations", observations, "FP32")],
            model_version=str(version),
            outputs=_outputs("actions", "q_values"),
            request_id="req-7",
            headers=keyed(),
        )
        expected = DQNPolicy(registry, "cartpole", version).act(observations)
        assert answer.get_response()["model_version"] == str(version)
        assert answer.get_response()["id"] == "req-7"
        assert answer.as_numpy("actions").tolist() == expected["actions"]
        np.testing.assert_allclose(answer.as_numpy("q_values"), expected["q_values"], rtol=1e-6)
    # Not named: the canary split decides, and the answer says which.
    seen = {
        triton_client.infer(
            "cartpole", [_input("observations", observations[:1], "FP32")], headers=keyed()
        ).get_response()["model_version"]
        for _ in range(30)
    }
    assert seen == {"1", "2"}, seen
    # XGBoost: the feature columns in the model's order, as the native route's rows.
    features = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    answer = triton_client.infer(
        "risk",
        [_input("features", features, "FP32")],
        outputs=_outputs("probabilities"),
        headers=keyed(),
    )
    rows = [dict(zip("abc", map(float, row))) for row in features]
    native = httpx.post(
        f"http://127.0.0.1:{PORT}/xgboost/risk/predict", json={"rows": rows}, headers=keyed()
    ).json()
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(answer.as_numpy("probabilities"), native["probabilities"], rtol=1e-6)
    # The recommender: users as BYTES, k as a parameter; a stranger is a cold start.
    users = np.array(["u1", "u7", "stranger"], dtype=np.object_)
    answer = triton_client.infer(
        "movies", [_input("user_ids", users, "BYTES")], parameters={"k": 4}, headers=keyed()
    )
    service = RecommenderService(registry, "movies", 1)
    for row, user in enumerate(users):
        expected = service.recommend(str(user), 4)
        items = [
            i.decode() if isinstance(i, bytes) else i for i in answer.as_numpy("item_ids")[row]
        ]
        assert items[: len(expected["items"])] == [i["item_id"] for i in expected["items"]]
        assert bool(answer.as_numpy("cold_start")[row]) == bool(expected.get("cold_start"))


def test_tritonclients_default_binary_tensors_give_the_json_answers(client):
    _, triton_client = client
    observations = np.random.default_rng(2).normal(size=(256, 4)).astype(np.float32)
    binary = triton.InferInput("observations", [256, 4], "FP32")
    binary.set_data_from_numpy(observations)  # binary_data=True: tritonclient's default
    answers = [
        triton_client.infer("cartpole", inputs, model_version="1", headers=keyed(), outputs=outputs)
        for inputs, outputs in (
            ([binary], None),  # no outputs named: tritonclient asks for them in binary
            ([_input("observations", observations, "FP32")], _outputs("actions", "q_values")),
        )
    ]
    assert answers[0].get_response()["outputs"][0]["parameters"]["binary_data_size"] == 256 * 8
    assert "data" in answers[1].get_response()["outputs"][0]
    for name in ("actions", "q_values"):
        assert (answers[0].as_numpy(name) == answers[1].as_numpy(name)).all()
    users = triton.InferInput("user_ids", [2], "BYTES")
    users.set_data_from_numpy(np.array(["u1", "stranger"], dtype=np.object_))
    answer = triton_client.infer("movies", [users], parameters={"k": 3}, headers=keyed())
    assert answer.as_numpy("item_ids").shape == (2, 3)
    assert answer.as_numpy("cold_start").tolist() == [False, True]


def test_tritonclient_classifies_and_segments_base64_image_files(client):
    _, triton_client = client
    images = np.array([png((250, 10, 10)), png((10, 10, 250))], dtype=np.object_)
    answer = triton_client.infer(
        "shapes", [_input("images", images, "BYTES")], parameters={"k": 2}, headers=keyed()
    )
    native = httpx.post(
        f"http://127.0.0.1:{PORT}/vision/shapes/classify",
        json={"images": images.tolist(), "k": 2},
        headers=keyed(),
    ).json()["predictions"]
    labels = [[_text(label) for label in row] for row in answer.as_numpy("labels")]
    assert labels == [[p["class"] for p in image] for image in native]
    expected = [[p["probability"] for p in image] for image in native]
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=1e-6)
    answer = triton_client.infer("scenes", [_input("images", images, "BYTES")], headers=keyed())
    masks = answer.as_numpy("masks")
    native = httpx.post(
        f"http://127.0.0.1:{PORT}/vision/scenes/segment",
        json={"images": images.tolist()},
        headers=keyed(),
    ).json()
    assert masks.dtype == np.uint8 and masks.shape == (2, 40, 40)
    for mask, image in zip(masks, native["predictions"]):
        decoded = Image.open(io.BytesIO(base64.b64decode(image["mask_png"])))
        assert (mask == np.asarray(decoded)).all()
    assert [_text(c) for c in answer.as_numpy("classes")] == native["classes"]
    # Masks of one request form one tensor: images of two sizes are refused, before work.
    mixed = np.array([png((250, 10, 10)), png((10, 10, 250), size=32)], dtype=np.object_)
    with pytest.raises(InferenceServerException, match="one size"):
        triton_client.infer("scenes", [_input("images", mixed, "BYTES")], headers=keyed())


def test_kserves_rest_wire_format_over_plain_http(client):
    """What KServe's InferenceRESTClient (protocol v2) sends and reads, over plain HTTP:
    the kserve package pins protobuf < 7 and pandas < 3, older than the Ray 2.60 stack
    rayline installs (docs/serving.md), so its client is not installed beside it."""
    registry, _ = client
    base = f"http://127.0.0.1:{PORT}"
    assert httpx.get(f"{base}/v2/health/live", headers=keyed()).json() == {"live": True}
    assert httpx.get(f"{base}/v2/health/ready", headers=keyed()).json() == {"ready": True}
    ready = httpx.get(f"{base}/v2/models/risk/ready", headers=keyed())
    assert ready.status_code == 200 and ready.json() == {"name": "risk", "ready": True}
    rows = [[0.5, -1.0, 2.0], [0.0, 0.1, -0.3]]
    body = {  # InferRequest.to_rest(): flat data, parameters per input
        "id": "kserve-1",
        "inputs": [
            {
                "name": "features",
                "shape": [2, 3],
                "datatype": "FP32",
                "data": sum(rows, []),
                "parameters": {},
            }
        ],
    }
    answer = httpx.post(
        f"{base}/v2/models/risk/infer",
        json=body,
        headers={**keyed(), "content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    response = answer.json()  # InferResponse.from_rest() reads these
    assert response["id"] == "kserve-1" and response["model_name"] == "risk"
    assert response["model_version"] == "1"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert (
        outputs["probabilities"]["shape"] == [2] and outputs["predictions"]["datatype"] == "INT64"
    )
    expected = BoostedService(registry, "risk", 1).predict_features(np.array(rows, np.float32))
    np.testing.assert_allclose(
        outputs["probabilities"]["data"], expected["probabilities"], rtol=1e-6
    )


def test_bad_protocol_requests_are_refused_with_the_protocols_errors(client):
    _, triton_client = client
    observations = np.zeros((2, 4), dtype=np.float32)
    cases = {
        "a wrong datatype": (
            [_input("observations", observations.astype(np.int64), "INT64")],
            "datatype INT64, expected FP32",
        ),
        "a wrong shape": ([_input("observations", np.zeros((2, 5), np.float32), "FP32")], "[2, 5]"),
        "a wrong input name": ([_input("obs", observations, "FP32")], "observations"),
    }
    for case, (inputs, message) in cases.items():
        with pytest.raises(InferenceServerException, match=message):
            triton_client.infer("cartpole", inputs, headers=keyed())
            pytest.fail(case)
    with pytest.raises(InferenceServerException, match="no version 9"):
        triton_client.infer(
            "cartpole",
            [_input("observations", observations, "FP32")],
            model_version="9",
            headers=keyed(),
        )
    # tritonclient's default, binary tensors: a NaN (which JSON cannot carry) is refused.
    binary = triton.InferInput("observations", [2, 4], "FP32")
    binary.set_data_from_numpy(np.array([[np.nan, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    with pytest.raises(InferenceServerException, match="not a finite FP32"):
        triton_client.infer("cartpole", [binary], headers=keyed())
    # Plain HTTP, as other clients send it: the status and the protocol's error body.
    url = f"http://127.0.0.1:{PORT}/v2/models/cartpole/infer"
    tensor = {"name": "observations", "shape": [1, 4], "datatype": "FP32"}
    overflow = httpx.post(
        url, json={"inputs": [{**tensor, "data": [1e39, 0, 0, 0]}]}, headers=keyed()
    )
    assert overflow.status_code == 400 and "finite FP32" in overflow.json()["error"]
    strings = httpx.post(
        url, json={"inputs": [{**tensor, "data": ["1", 0, 0, 0]}]}, headers=keyed()
    )
    assert strings.status_code == 400 and "JSON numbers" in strings.json()["error"]
    unknown = httpx.post(
        f"http://127.0.0.1:{PORT}/v2/models/nope/infer", json={"inputs": []}, headers=keyed()
    )
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    answered = httpx.post(url, json={"inputs": [{**tensor, "data": [0, 0, 0, 0]}]}, headers=keyed())
    assert answered.status_code == 200
    # Counted as the model's answer like the native route's: the version header is set.
    assert answered.headers["x-rayline-model"] == f"cartpole/{answered.json()['model_version']}"
