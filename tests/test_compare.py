"""Champion and challenger: two versions on the same evaluation, a gated promotion, and
every decision in the model's history. Policies with known behaviour: a hand-set
Q-network that pushes the cart towards the side the pole falls to (CartPole's classic
heuristic, hundreds of steps) against one that pushes away (about 9 steps)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rayline import cli, models_command
from rayline.compare import gate_passes, paired
from rayline.rl.networks import NetworkSpec, build_q_network
from rayline.store import ModelRegistry

SPEC = NetworkSpec([4], 2, [2], dueling=False)


def hand_policy(towards_the_fall: bool) -> bytes:
    """Q(right) = relu(angle + angular velocity), Q(left) = relu(-(...)), or swapped."""
    network = build_q_network(SPEC)
    first, second = network.head.advantage[0], network.head.advantage[2]
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]]))
        first.bias.zero_()
        order = [[0.0, 1.0], [1.0, 0.0]] if towards_the_fall else [[1.0, 0.0], [0.0, 1.0]]
        second.weight.copy_(torch.tensor(order))
        second.bias.zero_()
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return buffer.getvalue()


def register(registry, good: bool, env_id: str = "CartPole-v1", spec: NetworkSpec = SPEC):
    files = {"policy.pt": hand_policy(good), "network.json": json.dumps(spec.__dict__).encode()}
    return registry.register("pole", files, kind="dqn", config={"env": {"id": env_id}})


def test_paired_differences_and_their_interval_on_hand_made_scores():
    same_gain = paired("return", True, (1, [1.0, 2.0, 3.0, 4.0]), (2, [2.0, 3.0, 4.0, 5.0]))
    assert same_gain.delta == 1.0 and same_gain.ci95 == (1.0, 1.0) and same_gain.better == "b"
    assert same_gain.a == {"version": 1, "score": 2.5} and same_gain.n == 4
    # Lower is better: b's smaller loss is b's gain; a's is a's.
    loss = paired("loss", False, (1, [0.5, 0.5, 0.6]), (2, [0.4, 0.4, 0.5]))
    assert loss.delta == pytest.approx(0.1) and loss.better == "b"
    mixed = paired("return", True, (1, [0.0, 10.0, 0.0, 10.0]), (2, [10.0, 0.0, 10.0, 0.0]))
    assert mixed.delta == 0.0 and mixed.ci95[0] < 0 < mixed.ci95[1] and mixed.better == "neither"
    assert gate_passes(same_gain, 1.0) and not gate_passes(same_gain, 1.5)
    assert not gate_passes(mixed, 0.0)
    with pytest.raises(ValueError):
        paired("return", True, (1, [1.0, 2.0]), (2, [1.0]))


def test_compare_plays_both_policies_on_the_same_fresh_seeds(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    register(registry, good=False)  # v1
    register(registry, good=True)  # v2
    argv = ["models", "compare", "pole", "1", "2", "--episodes", "10", "--store", store]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["metric"] == "eval_return_mean" and result["higher_is_better"]
    assert result["a"]["version"] == 1 and result["a"]["score"] < 15
    assert result["b"]["version"] == 2 and result["b"]["score"] > 100
    assert (
        result["better"] == "b" and result["n"] == 10 and 0 < result["ci95"][0] <= result["delta"]
    )
    assert any(line.strip().startswith("v2") for line in lines[:-1])  # the table
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result  # the same seeds, the same answer
    assert cli.main(["models", "compare", "pole", "2", "2", "--json", "--store", store]) == 0
    itself = json.loads(capsys.readouterr().out)
    assert itself["delta"] == 0.0 and itself["better"] == "neither"


def test_versions_that_cannot_be_compared_are_refused_naming_the_difference(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    register(registry, good=True)
    register(registry, good=True, env_id="Acrobot-v1")
    assert cli.main(["models", "compare", "pole", "1", "2", "--store", store]) == 2
    assert "env id CartPole-v1 vs Acrobot-v1" in capsys.readouterr().err
    registry.register("pole", {"model.json": b"{}"}, kind="xgboost")
    assert cli.main(["models", "compare", "pole", "1", "3", "--store", store]) == 2
    assert "kinds dqn and xgboost" in capsys.readouterr().err
    assert (
        cli.main(["models", "compare", "pole", "1", "2", "--episodes", "1", "--store", store]) == 2
    )


def test_a_gated_promotion_moves_the_alias_only_for_a_better_version(tmp_path, capsys):
    store = str(tmp_path)
    registry = ModelRegistry(store)
    register(registry, good=False)  # v1
    register(registry, good=True)  # v2
    gate = ["--gate", "--episodes", "10", "--store", store]
    # No holder yet: promoted without a comparison.
    assert cli.main(["models", "promote", "pole", "1", *gate]) == 0
    assert "no holder" in capsys.readouterr().out
    assert cli.main(["models", "promote", "pole", "2", *gate]) == 0
    assert "production -> pole v2" in capsys.readouterr().out
    assert registry.aliases("pole")["production"] == 2
    # The worse one back, or one no better (the same policy again): refused, exit 3.
    assert cli.main(["models", "promote", "pole", "1", *gate]) == models_command.GATE_REFUSED
    assert "not promoted: v1" in capsys.readouterr().err
    register(registry, good=True)  # v3, the same policy as v2
    assert cli.main(["models", "promote", "pole", "3", *gate]) == models_command.GATE_REFUSED
    assert cli.main(["models", "promote", "pole", "2", *gate]) == 0  # it holds it already
    assert "already" in capsys.readouterr().out
    assert registry.aliases("pole")["production"] == 2
    for bad in ("nan", "-1", "inf"):  # valid floats, not valid margins: exit 2, nothing moved
        assert cli.main(["models", "promote", "pole", "3", *gate, "--min-delta", bad]) == 2
    events = registry.history("pole")
    moved = [e for e in events if e["event"] == "promoted" and e["alias"] == "production"]
    assert [e["version"] for e in moved] == [1, 2]
    assert moved[1]["comparison"]["better"] == "b" and moved[1]["previous"] == 1
    worse, same = [e for e in events if e["event"] == "promotion_refused"]
    assert (worse["version"], worse["holder"], worse["comparison"]["better"]) == (1, 2, "a")
    assert (same["version"], same["comparison"]["delta"], same["comparison"]["better"]) == (
        3,
        0.0,
        "neither",
    )


def register_boosted(registry, data_path: str, rounds: int):
    """An XGBoost model of `rounds` rounds registered as its pipeline registers one: the
    run's config and the fingerprint of the tables it was scored on."""
    from rayline.boosting.config import XGBoostConfig
    from rayline.boosting.pipeline import load_data, table_fingerprint
    from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
    from rayline.config import from_dict, to_dict

    cfg = from_dict(XGBoostConfig, {"pipeline": "xgboost", "data": {"path": data_path}})
    data = load_data(cfg)
    train, valid, task = data["train"], data["valid"], data["task"]
    params = booster_params(TreeParams(max_depth=2, eta=0.3), task, threads=1, seed=0)
    model = fit(
        params, task, train.dmatrix(), valid.dmatrix(), rounds=rounds, tracker=BestRound(task, 0)
    )
    return registry.register(
        "risk",
        model.files(),
        kind="xgboost",
        config=to_dict(cfg),
        data_fingerprint=table_fingerprint(train, valid),
    )


def test_xgboost_versions_compare_on_the_validation_rows_they_recorded(tmp_path, capsys):
    """One round of boosting against forty on breast_cancer's validation split: the
    forty-round model has the lower log loss row for row; the comparison is refused once
    the data it was scored on has changed."""
    import pyarrow.parquet as pq

    from rayline.boosting.data import export_sklearn

    data_path = export_sklearn("breast_cancer", str(tmp_path / "data"))
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    register_boosted(registry, data_path, rounds=1)
    register_boosted(registry, data_path, rounds=40)
    assert cli.main(["models", "compare", "risk", "1", "2", "--json", "--store", store]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "valid_logloss" and result["higher_is_better"] is False
    assert result["a"]["score"] > result["b"]["score"] and result["better"] == "b"
    assert result["n"] == 114  # a fifth of breast_cancer's 569 rows
    assert result["delta"] == pytest.approx(result["a"]["score"] - result["b"]["score"])
    # The gate: the strong one replaces the weak, the weak never comes back.
    gate = ["--gate", "--store", store]
    assert cli.main(["models", "promote", "risk", "1", *gate]) == 0  # no holder yet
    assert cli.main(["models", "promote", "risk", "2", *gate]) == 0
    assert cli.main(["models", "promote", "risk", "1", *gate]) == models_command.GATE_REFUSED
    assert registry.aliases("risk")["production"] == 2
    refused = [e for e in registry.history("risk") if e["event"] == "promotion_refused"]
    assert [(e["version"], e["holder"]) for e in refused] == [(1, 2)]
    capsys.readouterr()
    table = pq.read_table(data_path)
    pq.write_table(table.slice(0, 500), data_path)  # the recorded data is not there any more
    assert cli.main(["models", "compare", "risk", "1", "2", "--store", store]) == 2
    assert "has changed since it was registered" in capsys.readouterr().err


def test_recommender_configurations_compare_on_the_same_held_out_ratings(tmp_path, capsys):
    """Two taste groups that rate disjoint items, the larger group's items the most
    popular: most-popular recommends them to everyone, EASE recommends each user their
    own group's; EASE wins over the users, and a version against itself is a tie."""
    from rayline.config import from_dict, to_dict
    from rayline.recsys.pipeline import RecommenderConfig, build_model, data_fingerprint, load_data

    rng = np.random.default_rng(0)
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(60):
        group = range(0, 20) if user < 40 else range(20, 40)
        for item in rng.choice(list(group), 12, replace=False):
            rows.append(f"{user},{item},{rng.integers(3, 6)},0")
    (tmp_path / "ratings").mkdir()
    (tmp_path / "ratings" / "ratings.csv").write_text("\n".join(rows) + "\n")
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    for model in ("popular", "ease"):
        cfg = from_dict(
            RecommenderConfig,
            {
                "pipeline": "recommender",
                "model": model,
                "data": {"path": str(tmp_path / "ratings")},
            },
        )
        data = load_data(cfg)
        registry.register(
            "movies",
            build_model(cfg).fit(data).save(),
            kind="recommender",
            config=to_dict(cfg),
            data_fingerprint=data_fingerprint(data),
        )
    assert cli.main(["models", "compare", "movies", "1", "2", "--json", "--store", store]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "test_ndcg@10" and result["n"] == 60
    assert result["better"] == "b" and result["b"]["score"] > result["a"]["score"] + 0.1
    assert cli.main(["models", "compare", "movies", "2", "2", "--json", "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["ci95"] == [0.0, 0.0]


def constant_classifier(cls: int, n_classes: int = 3) -> bytes:
    """A ResNet-18 whose last layer answers class `cls` for every image."""
    from rayline.vision import transfer

    torch.manual_seed(0)
    model, head = transfer.build_model("resnet18", n_classes, "none")
    last = dict(model.named_modules())[head]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([10.0 if c == cls else 0.0 for c in range(n_classes)]))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def test_image_classifiers_compare_image_by_image_on_the_recorded_validation_images(
    tmp_path, capsys
):
    """A classifier that always answers one class against one that always answers
    another, on shapes with fewer squares: each is right exactly on its class's images,
    so the scores and their difference are the classes' shares of the validation set."""
    from rayline.config import from_dict, to_dict
    from rayline.vision.classification import TransferConfig, data_fingerprint, describe
    from rayline.vision.data import make_shapes, read_image_folder

    shapes = make_shapes(tmp_path, per_class=10, size=32)
    for folder in ("train", "val"):  # fewer of the second class, so the shares differ
        for extra in sorted((Path(shapes) / folder / "square").iterdir())[1:]:
            extra.unlink()
    cfg = from_dict(
        TransferConfig,
        {
            "pipeline": "transfer",
            "model": {"arch": "resnet18", "weights": "none"},
            "data": {"path": shapes, "crop_size": 32, "resize_size": 32},
        },
    )
    train, valid = read_image_folder(shapes, cfg.data.valid_fraction, cfg.data.split_seed)
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    for cls in (1, 0):  # v1 answers the square's class, v2 the first
        files = {
            "best.pt": constant_classifier(cls),
            "model.json": json.dumps(describe(cfg, train)).encode(),
        }
        registry.register(
            "shapes",
            files,
            kind="image_classifier",
            config=to_dict(cfg),
            data_fingerprint=data_fingerprint(train, valid),
        )
    labels = np.array(valid.labels)
    assert cli.main(["models", "compare", "shapes", "1", "2", "--json", "--store", store]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "valid_image_accuracy" and result["n"] == len(labels)
    assert result["a"]["score"] == pytest.approx(float(np.mean(labels == 1)))
    assert result["b"]["score"] == pytest.approx(float(np.mean(labels == 0)))
    assert result["delta"] == pytest.approx(float(np.mean(labels == 0) - np.mean(labels == 1)))
    next(iter((Path(shapes) / "val" / "circle").iterdir())).unlink()  # the data moved on
    assert cli.main(["models", "compare", "shapes", "1", "2", "--store", store]) == 2
    assert "have changed since registration" in capsys.readouterr().err


def test_segmenters_compare_image_by_image_with_a_closed_form_answer(tmp_path, capsys):
    """An untrained FCN-32s calls every pixel background (its scores start at zero), so
    on each validation image its mean IoU is the background's share of the pixels over
    the number of classes in the mask: the comparison reports exactly that, and a tie
    against itself."""
    from PIL import Image

    from rayline.config import from_dict, to_dict
    from rayline.vision import fcn
    from rayline.vision.data import make_shape_scenes, read_segmentation_folder
    from rayline.vision.segmentation import FCNConfig, data_fingerprint, describe

    scenes = make_shape_scenes(tmp_path, count=20, size=32)
    cfg = from_dict(
        FCNConfig,
        {
            "pipeline": "fcn",
            "model": {"arch": "resnet18", "variant": "fcn32s", "weights": "none"},
            "data": {"path": scenes},
        },
    )
    train, valid = read_segmentation_folder(scenes)
    buffer = io.BytesIO()
    torch.save(fcn.FCN("resnet18", len(train.classes), "fcn32s").state_dict(), buffer)
    files = {"best.pt": buffer.getvalue(), "model.json": json.dumps(describe(cfg, train)).encode()}
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    for _ in range(2):
        registry.register(
            "scenes",
            files,
            kind="segmenter",
            config=to_dict(cfg),
            data_fingerprint=data_fingerprint(train, valid),
        )
    expected = []
    for mask_path in valid.masks:
        mask = np.array(Image.open(mask_path))
        scored = mask[mask != 255]
        expected.append(np.mean(scored == 0) / len(np.unique(scored)))
    assert cli.main(["models", "compare", "scenes", "1", "2", "--json", "--store", store]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "valid_image_mean_iou" and result["n"] == len(valid.masks)
    assert result["a"]["score"] == pytest.approx(float(np.mean(expected)))
    assert result["delta"] == 0.0 and result["better"] == "neither"
