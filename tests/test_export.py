"""`rayline models export`: a registered model leaves rayline in a standard format and
gives the served answers there (ONNX Runtime for DQN policies and image models, XGBoost
itself for XGBoost models, the README's formula for recommenders), with a model.json
that describes it; bad requests are one line, exit 2, and leave nothing behind.

The `assert_*_parity` checks here run on hand-made models below and, on the model each
family's tiny pipeline run registers, in that family's pipeline test (test_dqn_learning,
test_boosting, test_vision, test_segmentation, test_recsys)."""

import json

import numpy as np
import onnxruntime
import pytest
import xgboost as xgb

from rayline import cli
from rayline.boosting.predictor import BoostedService
from rayline.rl.config import NetworkSpec
from rayline.rl.predictor import DQNPolicy
from rayline.serving.inference_protocol import TensorSpec
from rayline.store import ModelRegistry
from test_monitoring import boosted, recommender
from test_serving import register_policy

TOLERANCE = 1e-5
"""Q-values and probabilities: ONNX Runtime's float32 kernels against torch's and
XGBoost's own (measured differences: about 1e-7)."""


@pytest.fixture
def store(tmp_path):
    registry = ModelRegistry(str(tmp_path / "store"))
    register_policy(registry, seed=3)
    registry.promote("cartpole", 1)
    registry.register(
        "risk", boosted(["a", "b", "c"]).files(), kind="xgboost", metrics={"auc": 0.9}
    )
    registry.register("movies", recommender(5), kind="recommender")
    registry.register("notes", {"notes.txt": b"a kind no family serves"}, kind="notes")
    return registry


def register_network(registry, name: str, spec: NetworkSpec) -> None:
    """A freshly initialised Q-network of `spec`, registered as a DQN policy."""
    import io

    import torch

    from rayline.rl.networks import build_q_network

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(build_q_network(spec).state_dict(), buffer)
    files = {"policy.pt": buffer.getvalue(), "network.json": json.dumps(spec.__dict__).encode()}
    registry.register(name, files, kind="dqn")


def export(registry, *args) -> int:
    return cli.main(["models", "--store", registry.uri, "export", *args])


def test_a_dqn_policy_in_onnx_gives_the_served_q_values_and_actions(store, tmp_path, capsys):
    folder = tmp_path / "out"
    assert export(store, "cartpole", str(folder)) == 0  # the production alias by default
    assert "exported cartpole v1 as onnx" in capsys.readouterr().out
    described = json.loads((folder / "model.json").read_text())
    assert described["files"] == ["policy.onnx"] and described["kind"] == "dqn"
    assert described["metrics"] == {"eval_return_mean": 500.0}
    assert len(described["export_fingerprint"]) == 64
    assert_policy_parity(store, "cartpole", 1, folder)


def assert_policy_parity(registry, name: str, version: int, folder) -> None:
    """The ONNX export in `folder` of a vector-observation policy against the served
    policy on 1,000 observations: Q-values within TOLERANCE, the same greedy action
    wherever the two best Q-values are further apart than that, any batch size."""
    served = DQNPolicy(registry, name, version)
    described = json.loads((folder / "model.json").read_text())
    inputs, outputs = served.tensors()
    assert described["inputs"] == [spec.metadata() for spec in inputs]
    assert described["outputs"] == [spec.metadata() for spec in outputs]
    session = onnxruntime.InferenceSession(str(folder / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == ["observations"]
    shape = (1000, *served.spec.obs_shape)
    observations = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    actions, q_values = session.run(["actions", "q_values"], {"observations": observations})
    expected = served.act(observations)
    expected_q = np.asarray(expected["q_values"], dtype=np.float32)
    np.testing.assert_allclose(q_values, expected_q, atol=TOLERANCE)
    ordered = np.sort(expected_q, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > TOLERANCE
    assert clear.mean() > 0.99
    assert (actions[clear] == np.asarray(expected["actions"])[clear]).all()
    assert actions.dtype == np.int64 and q_values.dtype == np.float32
    one = session.run(None, {"observations": observations[:1]})[1]  # any batch
    assert one.shape == (1, served.spec.n_actions)


@pytest.mark.parametrize(
    "fmt, file", [("xgboost-json", "booster.json"), ("xgboost-ubjson", "booster.ubj")]
)
def test_an_xgboost_model_in_its_own_format_gives_the_served_probabilities(
    store, tmp_path, fmt, file
):
    folder = tmp_path / fmt
    assert export(store, "risk", "1", str(folder), "--format", fmt) == 0
    described = json.loads((folder / "model.json").read_text())
    assert described["files"] == sorted([file, "features.json"])
    named = {"feature_names": ["a", "b", "c"]}
    assert described["inputs"] == [TensorSpec("features", "FP32", (-1, 3), named).metadata()]
    features = assert_boosted_parity(store, "risk", 1, folder / file)
    assert features["feature_names"] == ["a", "b", "c"] and features["task"]["kind"] == "binary"


def assert_boosted_parity(registry, name: str, version: int, booster_file) -> dict:
    """XGBoost's own export (`booster_file`, features.json beside it) against the served
    model on 500 rows of its feature space: probabilities (or values) within TOLERANCE,
    the same classes. Returns features.json."""
    features = json.loads((booster_file.parent / "features.json").read_text())
    booster = xgb.Booster(model_file=str(booster_file))
    width = len(features["feature_names"])
    rows = np.random.default_rng(1).normal(size=(500, width)).astype(np.float32)
    exported = booster.predict(xgb.DMatrix(rows, feature_names=features["feature_names"]))
    served = BoostedService(registry, name, version).predict_features(rows)
    kind = features["task"]["kind"]
    if kind == "regression":
        np.testing.assert_allclose(exported, served["predictions"], rtol=TOLERANCE, atol=TOLERANCE)
        return features
    np.testing.assert_allclose(exported, served["probabilities"], atol=TOLERANCE)
    classes = (exported > 0.5).astype(int) if kind == "binary" else exported.argmax(axis=1)
    assert (classes == served["predictions"]).all()
    return features


def test_bad_exports_are_one_line_exit_2_and_leave_nothing(store, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        "an unknown model": (["nope", str(tmp_path / "o1")], "nope"),
        "an unknown version": (["cartpole", "7", str(tmp_path / "o2")], "7"),
        "a kind with no export": (["notes", "1", str(tmp_path / "o3")], "no export"),
        "a format the kind lacks": (
            ["cartpole", "1", str(tmp_path / "o4"), "--format", "tflite"],
            "exports as onnx",
        ),
        "a folder with files": (["cartpole", "1", str(taken)], "not an empty folder"),
        "a folder that cannot be made": (
            ["cartpole", "1", str(a_file / "out")],
            "cannot be written",
        ),
    }
    for case, (args, needle) in cases.items():
        capsys.readouterr()
        assert export(store, *args) == 2, case
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rayline: error:"), (case, lines)
        assert needle in lines[0], (case, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "store", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_dueling_policy_exports_too(tmp_path):
    """The dueling head (value + advantage - mean advantage) traced as served."""
    registry = ModelRegistry(str(tmp_path / "store"))
    register_network(registry, "duel", NetworkSpec([6], 3, [32, 32], dueling=True))
    assert export(registry, "duel", "1", str(tmp_path / "out")) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "policy.onnx"))
    observations = np.random.default_rng(2).normal(size=(200, 6)).astype(np.float32)
    _, q_values = session.run(None, {"observations": observations})
    expected = DQNPolicy(registry, "duel", 1).act(observations)["q_values"]
    np.testing.assert_allclose(q_values, expected, atol=TOLERANCE)


def assert_classifier_parity(registry, name: str, version: int, folder, images: list) -> None:
    """The ONNX classifier in `folder`, fed the 8-bit pixels its preprocessing.json says
    to make of `images` (base64 files), against the served classifier: probabilities
    within TOLERANCE, the same label wherever the two best are further apart."""
    import base64
    import io

    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from rayline.vision.predictors import ImageClassifierService

    steps = json.loads((folder / "preprocessing.json").read_text())
    pipeline = v2.Compose(
        [
            v2.Resize(steps["resize"]["shorter_side"], antialias=True),
            v2.CenterCrop(steps["center_crop"]),
            v2.PILToTensor(),
        ]
    )
    decoded = [Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB") for i in images]
    pixels = torch.stack([pipeline(image) for image in decoded]).numpy()
    session = onnxruntime.InferenceSession(str(folder / "classifier.onnx"))
    (probabilities,) = session.run(None, {"pixels": pixels})
    service = ImageClassifierService(registry, name, version)
    classes = service.classes
    served = service.predict(images, k=len(classes))
    expected = np.array(
        [
            [dict((p["class"], p["probability"]) for p in image)[c] for c in classes]
            for image in served["predictions"]
        ]
    )
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)
    ordered = np.sort(expected, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > TOLERANCE
    assert (probabilities.argmax(1)[clear] == expected.argmax(1)[clear]).all()


def assert_segmenter_parity(registry, name: str, version: int, folder, images: list) -> None:
    """The ONNX segmenter in `folder` on each of `images` (base64 files, full size)
    against the served masks: equal wherever the two best class scores are further apart
    than TOLERANCE, which is over 99 % of the pixels; masks that say something."""
    import base64
    import io

    import torch
    from PIL import Image

    from rayline.vision.predictors import SegmenterService

    session = onnxruntime.InferenceSession(str(folder / "segmenter.onnx"))
    segmenter = SegmenterService(registry, name, version)
    compared = total = 0
    said_something = False
    for encoded in images:
        image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
        (mask,) = session.run(None, {"pixels": np.asarray(image).transpose(2, 0, 1)[None]})
        answer = segmenter.predict([encoded])["predictions"][0]
        served_mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
        with torch.inference_mode():
            scores = segmenter.network(segmenter.transform(image)[None])[0].numpy()
        top = np.sort(scores, axis=0)
        clear = top[-1] - top[-2] > TOLERANCE
        assert mask.shape == (1, image.height, image.width) and mask.dtype == np.uint8
        assert (mask[0][clear] == served_mask[clear]).all()
        compared += int(clear.sum())
        total += image.width * image.height
        said_something |= len(np.unique(served_mask)) > 1
    assert compared > 0.99 * total and said_something


def _top_k_from_tables(folder, kind: str, k: int) -> dict[str, list[str]]:
    """Every training user's top-k, computed from the exported Parquet tables alone, as
    their README.md says (the test of the README)."""
    import pyarrow.parquet as pq

    ratings = pq.read_table(folder / "ratings.parquet").to_pydict()
    popularity = pq.read_table(folder / "popularity.parquet").to_pydict()
    items = popularity["item_id"]
    column = {item: i for i, item in enumerate(items)}
    users = sorted(set(ratings["user_id"]))
    rated = {u: {} for u in users}
    for u, i, r in zip(ratings["user_id"], ratings["item_id"], ratings["rating"]):
        rated[u][column[i]] = r
    scores = {}
    if kind == "als":
        tables = {t: pq.read_table(folder / f"{t}.parquet").to_pydict() for t in ("users", "items")}
        item_factors = np.array(tables["items"]["factors"])
        readme = (folder / "README.md").read_text()
        for u, factors, bias in zip(*(tables["users"][c] for c in ("user_id", "factors", "bias"))):
            scores[u] = item_factors @ np.array(factors) + np.array(tables["items"]["bias"])
            if "explicit" in readme:
                global_mean = float(readme.split("+ ")[2].split(" ")[0])
                scores[u] = scores[u] + global_mean + bias
    elif kind == "ease":
        weights = np.array(pq.read_table(folder / "weights.parquet").to_pydict()["weights"])
        for u in users:
            scores[u] = weights[list(rated[u])].sum(axis=0)
    elif kind == "user_knn":
        table = pq.read_table(folder / "neighbors.parquet").to_pydict()
        power = float((folder / "README.md").read_text().split("** ")[1].split()[0])
        for u, neighbours, sims in zip(
            table["user_id"], table["neighbor_ids"], table["similarities"]
        ):
            score = np.zeros(len(items))
            for v, s in zip(neighbours, sims):
                for i, r in rated[v].items():
                    score[i] += max(s, 0.0) ** power * r
            scores[u] = score
    tops = {}
    for u in users:
        score = scores[u].astype(np.float64).copy()
        score[list(rated[u])] = -np.inf
        order = sorted(range(len(items)), key=lambda i: (-score[i], i))[:k]
        tops[u] = [items[i] for i in order if np.isfinite(score[i])]
    return tops


@pytest.mark.parametrize("kind", ["user_knn", "als", "ease"])
def test_a_recommender_in_parquet_gives_the_served_top_k_by_its_readme(tmp_path, kind):
    from rayline.recsys.als import ALS
    from rayline.recsys.data import from_arrays, synthetic_ratings
    from rayline.recsys.ease import EASE
    from rayline.recsys.knn import UserKNN

    data, _ = synthetic_ratings(40, 30, seed=1)
    named = from_arrays(
        np.array([f"u{u}" for u in data.users]),
        np.array([f"m{i}" for i in data.items]),
        data.ratings,
    )
    model = {
        "user_knn": lambda: UserKNN(similarity="cosine", k=5, shrinkage=0, power=2.0),
        "als": lambda: ALS(factors=8, iterations=5, seed=0),
        "ease": lambda: EASE(),
    }[kind]().fit(named)
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("movies", model.save(), kind="recommender")
    assert export(registry, "movies", "1", str(tmp_path / "out")) == 0
    assert_recommender_parity(registry, "movies", 1, tmp_path / "out", kind)
    described = json.loads((tmp_path / "out" / "model.json").read_text())
    assert described["format"] == "parquet" and "README.md" in described["files"]


def assert_recommender_parity(registry, name: str, version: int, folder, kind: str) -> None:
    """Every training user's top 5 computed from the Parquet tables in `folder` by their
    README alone equals the served top 5."""
    from rayline.recsys.predictor import RecommenderService

    exported = _top_k_from_tables(folder, kind, k=5)
    service = RecommenderService(registry, name, version)
    served = {u: [i["item_id"] for i in service.recommend(u, 5)["items"]] for u in exported}
    assert exported and exported == served


def test_an_atari_policy_takes_its_stacked_frames_as_bytes(tmp_path):
    """Image stacks go in as UINT8 with the network's scaling inside the graph, as
    served; the metadata says UINT8 too."""

    registry = ModelRegistry(str(tmp_path / "store"))
    register_network(registry, "pong", NetworkSpec([4, 84, 84], 6, [512], dueling=True))
    assert export(registry, "pong", "1", str(tmp_path / "out")) == 0
    described = json.loads((tmp_path / "out" / "model.json").read_text())
    assert described["inputs"] == [
        {"name": "observations", "datatype": "UINT8", "shape": [-1, 4, 84, 84]}
    ]
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "policy.onnx"))
    assert session.get_inputs()[0].type == "tensor(uint8)"
    frames = np.random.default_rng(3).integers(0, 256, size=(200, 4, 84, 84), dtype=np.uint8)
    actions, q_values = session.run(None, {"observations": frames})
    served = DQNPolicy(registry, "pong", 1).act(frames)
    expected_q = np.asarray(served["q_values"], dtype=np.float32)
    np.testing.assert_allclose(q_values, expected_q, atol=TOLERANCE)
    ordered = np.sort(expected_q, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > TOLERANCE
    assert (actions[clear] == np.asarray(served["actions"])[clear]).all()
