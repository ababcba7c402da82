"""Transfer learning: known-answer schedules, what fine-tuning and feature extraction
may and may not change, image-folder data and its errors, and an end-to-end sweep whose
registered best-epoch model reproduces its trial's score."""

import base64
import copy
import io
import json
import math
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rayline import pipelines
from rayline.cli import main as cli_main
from rayline.config import ConfigError, DataError, from_dict
from rayline.serving.base import BadInput
from rayline.store import ModelRegistry
from rayline.vision import classification, pictures, training, transfer
from rayline.vision.classification import TransferConfig, loaders
from rayline.vision.data import make_shapes, read_image_folder
from rayline.vision.predictors import ImageClassifierService

CROP = 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """train/ and val/ folders of 32-pixel circles, squares and triangles."""
    return make_shapes(tmp_path_factory.mktemp("images"), per_class=15, size=CROP, seed=0)


def lrs(kind, epochs, warmup=0, **kwargs):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = training.make_scheduler(optimizer, kind, epochs, warmup, **kwargs)
    values = []
    for _ in range(epochs):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_learning_rate_schedules_per_epoch():
    assert lrs("constant", 3) == pytest.approx([0.1, 0.1, 0.1])
    assert lrs("step", 5, step_size=2, gamma=0.1) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    cosine = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs("cosine", 4) == pytest.approx(cosine)
    # linear warm-up from 0.1 x lr over 2 epochs, then the cosine over the other 4
    assert lrs("cosine", 6, warmup=2) == pytest.approx([0.01, 0.055, *cosine])


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("resnet18", "fc"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
    ],
)
def test_the_new_head_replaces_the_last_linear_layer(arch, head):
    model, found = transfer.build_model(arch, 3, "none")
    assert found == head
    assert model.get_submodule(head).out_features == 3
    assert model.eval()(torch.zeros(2, 3, CROP, CROP)).shape == (2, 3)


def test_weights_file_loads_without_unpickling_and_bad_files_are_refused(tmp_path):
    torch.manual_seed(7)
    source, _ = transfer.build_model("resnet18", 1000, "none")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, head = transfer.build_model("resnet18", 3, str(path))
    for name, tensor in source.state_dict().items():
        if not name.startswith(head + "."):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert model.fc.out_features == 3

    class Payload:  # a pickle that would run code if it were unpickled
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ConfigError, match="not a loadable state_dict"):
        transfer.build_model("resnet18", 3, str(evil))
    with pytest.raises(ConfigError, match="no such file"):
        transfer.build_model("resnet18", 3, str(tmp_path / "missing.pth"))
    small, _ = transfer.build_model("mobilenet_v3_small", 1000, "none")
    torch.save(small.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        transfer.build_model("resnet18", 3, str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        transfer.build_model("resnet_huge", 3, "none")


def one_epoch(shapes, mode, arch="resnet18", stages=1, **speedups):
    cfg = from_dict(
        TransferConfig, {"data": {"path": shapes, "crop_size": CROP}, "train": {"batch_size": 8}}
    )
    train, valid = read_image_folder(shapes, 0.2, 0)
    torch.manual_seed(0)
    model, head = transfer.build_model(arch, len(train.classes), "none")
    transfer.prepare_mode(model, head, mode, stages)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(transfer.parameter_groups(model, head, mode, 0.05, 0.1), lr=0.05)
    train_loader, _ = loaders(cfg, train, valid, torch.Generator().manual_seed(0))
    transfer.train_one_epoch(
        model,
        head,
        mode,
        nn.CrossEntropyLoss(),
        optimizer,
        train_loader,
        torch.device("cpu"),
        stages,
        **speedups,
    )
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return head, changed, optimizer


def test_a_bfloat16_channels_last_step_follows_the_float32_one_and_leaves_a_plain_model(shapes):
    """The same step in float32 and in bfloat16 autocast with the NHWC layout moves
    every layer's weights the same way (the gradients agree); after it the weights are
    float32 and in the default layout again (what validation, saving and serving see)."""
    torch.manual_seed(0)
    start, head = transfer.build_model("resnet18", 3, "none")
    moved = {}
    for name, speedups in {
        "float32": {},
        "bfloat16": {"precision": "bfloat16", "channels_last": True},
    }.items():
        torch.manual_seed(1)  # the same augmentations for both
        model = copy.deepcopy(start)
        transfer.prepare_mode(model, head, "finetune", 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = from_dict(
            TransferConfig,
            {"data": {"path": shapes, "crop_size": CROP}, "train": {"batch_size": 8}},
        )
        train, valid = read_image_folder(shapes, 0.2, 0)
        loader, _ = loaders(cfg, train, valid, torch.Generator().manual_seed(0))
        figures = transfer.train_one_epoch(
            model,
            head,
            "finetune",
            nn.CrossEntropyLoss(),
            optimizer,
            [next(iter(loader))],  # one step: then the weights move by -lr x the gradient
            torch.device("cpu"),
            **speedups,
        )
        assert figures["images_per_s"] > 0
        for weight in model.parameters():
            assert weight.dtype == torch.float32 and weight.is_contiguous()
        moved[name] = {
            k: (v.detach() - start.state_dict()[k]).flatten() for k, v in model.named_parameters()
        }
    similarity = {
        layer: float(torch.nn.functional.cosine_similarity(delta, moved["bfloat16"][layer], dim=0))
        for layer, delta in moved["float32"].items()
    }
    # bfloat16 keeps 8 bits of mantissa: at initialisation, where a layer's gradient sums
    # many terms that mostly cancel, that leaves a cosine of ~0.93 (0.88 at worst here);
    # a step in a wrong layout or with a lost gradient would be near 0.
    assert min(similarity.values()) > 0.8, similarity
    assert np.median(list(similarity.values())) > 0.9, similarity


def test_feature_extraction_changes_the_head_alone(shapes):
    head, changed, optimizer = one_epoch(shapes, "feature_extract")
    # weights and batch-norm running statistics of the backbone are untouched
    assert changed == {f"{head}.weight", f"{head}.bias"}
    assert len(optimizer.param_groups) == 1


def test_adapting_batch_norm_sets_each_layers_statistics_to_its_inputs_on_the_new_data():
    """AdaBN: the running mean and (unbiased) variance of every batch-norm layer become
    those of its inputs over the given images, whatever they were, with every weight as
    it was; a model in eval mode afterwards."""
    torch.manual_seed(0)
    model, head = transfer.build_model("resnet18", 3, "none")
    transfer.prepare_mode(model, head, "feature_extract", 1)
    model.bn1.running_mean.fill_(5.0)  # the source's statistics, far from the new data's
    weights = {k: v.clone() for k, v in model.named_parameters()}
    images = torch.randn(12, 3, 32, 32) * 2 + 1
    seen = {}

    def keep_inputs(name):
        def hook(module, inputs, output) -> None:  # None: the output stays the layer's
            seen[name] = inputs[0].clone()

        return hook

    hooks = [
        model.get_submodule(name).register_forward_hook(keep_inputs(name))
        for name in ("bn1", "layer4.1.bn2")
    ]
    # One batch: the cumulative average over batches is that batch's figures exactly.
    transfer.adapt_batch_norm(model, [(images, None)], torch.device("cpu"))
    for hook in hooks:
        hook.remove()
    for name, inputs in seen.items():
        norm = model.get_submodule(name)
        torch.testing.assert_close(norm.running_mean, inputs.mean((0, 2, 3)))
        torch.testing.assert_close(norm.running_var, inputs.var((0, 2, 3), unbiased=True))
        assert norm.momentum == 0.1 and not norm.training
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_partial_trains_exactly_the_last_stages(shapes):
    """ResNet-18 with its last 2 stages (layer3, layer4) training: every weight and
    batch-norm statistic of conv1, bn1, layer1 and layer2 is unchanged after an epoch,
    every one of layer3's and layer4's changed."""
    head, changed, optimizer = one_epoch(shapes, "partial", stages=2)
    model, _ = transfer.build_model("resnet18", 3, "none")
    assert transfer.stages(model, head) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    names = set(model.state_dict())
    trained = {n for n in names if n.split(".")[0] in ("layer3", "layer4", "fc")}
    trained -= {n for n in trained if n.endswith("num_batches_tracked")}
    assert trained <= changed, sorted(trained - changed)[:5]
    assert all(n.split(".")[0] in ("layer3", "layer4", "fc") for n in changed), changed
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.005])


def test_partial_on_a_features_backbone_keeps_the_layers_after_the_stages_training(shapes):
    """MobileNetV3: its stages are the blocks of `features`; the classifier's first layer
    (between the stages and the new head) trains with the head."""
    head, changed, _ = one_epoch(shapes, "partial", arch="mobilenet_v3_small", stages=1)
    model, _ = transfer.build_model("mobilenet_v3_small", 3, "none")
    backbone = transfer.stages(model, head)
    assert backbone[0] == "features.0" and len(backbone) == 13
    last = backbone[-1] + "."
    assert {f"{head}.weight", "classifier.0.weight", f"{last}0.weight"} <= changed
    assert all(n.startswith((last, "classifier.")) for n in changed), changed
    with pytest.raises(ConfigError, match="has 13 stages"):
        transfer.frozen_modules(model, head, "partial", 14)


def test_fine_tuning_trains_the_backbone_at_its_own_rate(shapes):
    head, changed, optimizer = one_epoch(shapes, "finetune")
    assert {
        f"{head}.weight",
        "conv1.weight",
        "layer4.1.conv2.weight",
        "bn1.running_mean",
    } <= changed
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.005])


def test_image_folder_layouts_and_bad_folders(shapes, tmp_path):
    train, valid = read_image_folder(shapes, 0.2, 0)
    assert train.classes == ("circle", "square", "triangle")
    assert (len(train), len(valid)) == (36, 9)  # make_shapes holds out 3 of 15 per class
    assert all(
        p.split("/")[-2] == train.classes[label] for p, label in zip(train.paths, train.labels)
    )
    # without train/ and val/, a seeded per-class split
    flat_train, flat_valid = read_image_folder(f"{shapes}/train", 0.25, 1)
    again = read_image_folder(f"{shapes}/train", 0.25, 1)
    assert (flat_train, flat_valid) == again
    assert len(flat_valid) == 9 and not set(flat_train.paths) & set(flat_valid.paths)

    with pytest.raises(DataError, match="no such directory"):
        read_image_folder(str(tmp_path / "nowhere"), 0.2, 0)
    (tmp_path / "one" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="found 1 class folder"):
        read_image_folder(str(tmp_path / "one"), 0.2, 0)
    (tmp_path / "one" / "dogs").mkdir()
    (tmp_path / "one" / "cats" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="dogs: no images"):
        read_image_folder(str(tmp_path / "one"), 0.2, 0)
    (tmp_path / "one" / "dogs" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="one image cannot be split"):
        read_image_folder(str(tmp_path / "one"), 0.2, 0)
    (tmp_path / "one" / "cats" / "c.png").write_bytes(b"not a png")
    (tmp_path / "one" / "dogs" / "d.png").write_bytes(b"not a png")
    broken, _ = read_image_folder(str(tmp_path / "one"), 0.5, 0)
    with pytest.raises(DataError, match=r"\.png: not a readable image"):
        broken.read(0)
    assert cli_main(["data", "make-shapes", str(tmp_path), "--per-class", "2"]) == 2


@pytest.mark.slow
def test_transfer_sweep_registers_the_best_epoch_of_the_best_trial(
    ray_session, shapes, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder, on the user's word
    pipeline = pipelines.get_pipeline("transfer")
    cfg = from_dict(
        TransferConfig,
        {
            "data": {"path": shapes, "crop_size": CROP, "resize_size": CROP},
            "model": {"arch": "resnet18", "weights": "none"},
            "optim": {"optimizer": "adamw", "lr": 0.002, "backbone_lr_scale": 1.0},
            "schedule": {"kind": "cosine", "warmup_epochs": 1},
            "train": {"epochs": 4, "batch_size": 12},
            "run": {
                "name": "shapes",
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
                "mlflow": {"tracking_uri": str(tmp_path / "mlruns")},
            },
            "sweep": {
                "num_samples": 1,
                "params": {"model.mode": {"grid": ["finetune", "feature_extract"]}},
            },
        },
    )
    outcome = pipelines.run(pipeline, cfg, sweep=True)
    results = list(outcome.results)
    assert len(results) == 2 and all(r.error is None for r in results)
    # Tracked in MLflow: a run per trial under the sweep's, each metric against epochs.
    from mlflow import MlflowClient

    client = MlflowClient(str(tmp_path / "mlruns"))
    runs = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {c.data.params["model.mode"] for c in children} == {"finetune", "feature_extract"}
    assert {c.data.tags["rayline.family"] for c in children} == {"vision"}
    for child in children:
        accuracy = client.get_metric_history(child.info.run_id, "valid_accuracy")
        assert [point.step for point in accuracy] == [1, 2, 3, 4]
    assert [c.data.tags.get("rayline.registered") for c in children].count("shapes v1") == 1
    for result in results:
        history = result.metrics_dataframe
        assert list(history["epoch"]) == [1, 2, 3, 4]
        best = history["best_valid_accuracy"].iloc[-1]
        assert best == history["valid_accuracy"].max()
        assert history["valid_accuracy"].iloc[result.metrics["best_epoch"] - 1] == best
        assert history["lr"].iloc[0] == pytest.approx(0.0002)  # warm-up starts at 0.1 x lr
    best_trial = max(results, key=lambda r: r.metrics["best_valid_accuracy"])
    assert outcome.best.metrics["best_valid_accuracy"] == best_trial.metrics["best_valid_accuracy"]

    registry = ModelRegistry(str(tmp_path / "store"))
    version = registry.get("shapes", 1)
    assert version.kind == "image_classifier"
    assert set(version.files) == {
        "best.pt",
        "model.json",
        "curves.png",
        "confusion.png",
        "profile.json",
    }
    meta = json.loads(registry.read_file(version, "model.json"))
    assert meta["classes"] == ["circle", "square", "triangle"] and meta["crop_size"] == CROP

    # The pictures: registered and beside the best trial's checkpoints; the confusion
    # matrix is the registered model's, on the validation images.
    for name, size in (("curves.png", pictures.CURVES_SIZE), ("confusion.png", (228, 228))):
        data = registry.read_file(version, name)
        assert Path(outcome.best.path, name).read_bytes() == data
        with Image.open(io.BytesIO(data)) as png:
            assert (png.format, png.size) == ("PNG", size), name
    _, valid = read_image_folder(shapes, 0.2, 0)
    confusion = classification.confusion_matrix(registry.read_files(version), cfg, valid)
    assert confusion.sum() == len(valid)
    accuracy = np.trace(confusion) / confusion.sum()
    assert accuracy == version.metrics["best_valid_accuracy"]

    # The feature extractor's saved backbone is the seeded random one it started from.
    extractor = next(r for r in results if r.config["model"]["mode"] == "feature_extract")
    with extractor.checkpoint.as_directory() as directory:
        saved = torch.load(f"{directory}/best.pt", weights_only=True)
    torch.manual_seed(cfg.run.seed)
    initial, head = transfer.build_model("resnet18", 3, "none")
    for name, tensor in initial.state_dict().items():
        if not name.startswith(head + "."):
            assert torch.equal(saved[name], tensor), name

    # Served: the registered model classifies base64 image files.
    registry.promote("shapes", 1)
    service = ImageClassifierService(registry, "shapes")
    image = sorted(Path(shapes, "val", "circle").iterdir())[0]
    answer = service.predict([base64.b64encode(image.read_bytes()).decode()], k=5)
    top = answer["predictions"][0]
    assert len(top) == 3 and {c["class"] for c in top} == {"circle", "square", "triangle"}
    assert [c["probability"] for c in top] == sorted((c["probability"] for c in top), reverse=True)
    assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BadInput, match=r"images\[0\]: not valid base64"):
        service.predict(["***"], k=1)
    with pytest.raises(BadInput, match=r"images\[0\]: not an image"):
        service.predict([base64.b64encode(b"plain text").decode()], k=1)
    # Exported to ONNX, the pipeline's classifier gives the served probabilities through
    # the preprocessing it writes down: the validation images, and each again at
    # another size and shape (the resize and the crop at work).
    from test_export import assert_classifier_parity, export

    assert export(registry, "shapes", "1", str(tmp_path / "onnx")) == 0
    encoded = []
    sizes = np.random.default_rng(4).integers(20, 90, size=(50, 2))
    for path, (width, height) in zip(sorted(Path(shapes, "val").glob("*/*")), sizes):
        with Image.open(path) as image:
            for size in (image.size, (int(width), int(height))):
                buffer = io.BytesIO()
                image.convert("RGB").resize(size).save(buffer, format="PNG")
                encoded.append(base64.b64encode(buffer.getvalue()).decode())
    assert_classifier_parity(registry, "shapes", 1, tmp_path / "onnx", encoded)


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly_where_it_stopped(ray_session, shapes, tmp_path, capsys):
    """SIGTERM after the first epoch's checkpoint, then --resume: the run ends where an
    uninterrupted one does, to the bit (weights, optimiser, schedule and RNG states are
    all in the checkpoint)."""
    pipeline = pipelines.get_pipeline("transfer")

    def config(name):
        return from_dict(
            TransferConfig,
            {
                # 64-pixel crops of the 32-pixel images: epochs long enough to stop mid-run
                "data": {"path": shapes, "crop_size": 64, "resize_size": 64},
                "model": {"arch": "resnet18", "weights": "none"},
                "optim": {"optimizer": "sgd", "lr": 0.01},
                "schedule": {"kind": "step", "step_size": 2, "gamma": 0.5},
                "train": {"epochs": 4, "batch_size": 12},
                "run": {
                    "name": name,
                    "storage_path": str(tmp_path / "results"),
                    "register": False,
                },
            },
        )

    straight = pipelines.run(pipeline, config("straight"), sweep=False).best.metrics
    # One progress line per epoch, with the figures a person follows a run by.
    lines = [line for line in capsys.readouterr().out.splitlines() if "] epoch " in line]
    assert [line.split("] epoch ")[1].split(":")[0] for line in lines] == ["1", "2", "3", "4"]
    for name in ("train_loss=", "valid_accuracy=", "valid_loss=", "lr=0.01 ", "train images/s)"):
        assert name in lines[0], lines[0]
    experiment = tmp_path / "results" / "stopped"

    def interrupt_after_the_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not list(experiment.glob("*/checkpoint_000000")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # as `ray job stop` does; Ctrl-C is alike

    threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True).start()
    with pytest.raises(pipelines.Interrupted):
        pipelines.run(pipeline, config("stopped"), sweep=False)
    latest = max(experiment.glob("*/checkpoint_*"))
    stopped_after = torch.load(latest / "state.pt", weights_only=True)["epoch"]
    assert 1 <= stopped_after < 4  # stopped before the end
    resumed = pipelines.run(pipeline, config("stopped"), sweep=False, resume=True).best.metrics
    keys = ["epoch", "train_loss", "valid_loss", "best_valid_accuracy", "best_epoch", "lr"]
    assert {k: resumed[k] for k in keys} == {k: straight[k] for k in keys}


def test_registry_weights_map_a_registered_backbone_exactly(tmp_path):
    """`registry://NAME@ALIAS` (or @VERSION): every backbone tensor of the registered
    classifier, the head fresh for the new classes; what does not fit is named."""
    from rayline.store import ModelRegistry
    from rayline.vision.training import BEST_FILE, META_FILE

    torch.manual_seed(1)
    source, head = transfer.build_model("resnet18", 10, "none")
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    store = str(tmp_path / "store")
    registry = ModelRegistry(store)
    meta = {"arch": "resnet18", "classes": [str(c) for c in range(10)]}
    files = {BEST_FILE: buffer.getvalue(), META_FILE: json.dumps(meta).encode()}
    registry.register("digits-source", files, kind="transfer")
    registry.promote("digits-source", 1, "production")
    for ref in ("registry://digits-source@production", "registry://digits-source@1"):
        model, new_head = transfer.build_model("resnet18", 3, ref, store)
        assert new_head == head and model.get_submodule(head).out_features == 3
        mapped = model.state_dict()
        for name, tensor in source.state_dict().items():
            if not name.startswith(head + "."):
                assert torch.equal(mapped[name], tensor), name
    with pytest.raises(ConfigError, match="a resnet18 classifier; model.arch is mobilenet"):
        transfer.build_model("mobilenet_v3_small", 3, "registry://digits-source", store)
    with pytest.raises(ConfigError, match="not registered"):
        transfer.build_model("resnet18", 3, "registry://nothing@production", store)
    with pytest.raises(ConfigError, match="no alias 'staging'"):
        transfer.build_model("resnet18", 3, "registry://digits-source@staging", store)
    bad = dict(source.state_dict())
    bad["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    del bad["layer4.1.bn2.bias"]
    with pytest.raises(ConfigError, match=r"shapes differ: layer1.0.conv1.weight .*missing: "):
        transfer.load_backbone(transfer.pretrained("resnet18", "none"), bad, "registry://x")
