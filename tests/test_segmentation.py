"""FCN segmentation: exact bilinear upsampling, the network's shapes and start, metrics
on hand-made masks, segmentation folders and their errors, and an end-to-end run whose
registered model segments over the same code Serve uses."""

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rayline import pipelines
from rayline.cli import main as cli_main
from rayline.config import ConfigError, DataError, from_dict
from rayline.serving.base import BadInput
from rayline.store import ModelRegistry
from rayline.testing import cpu_has_native_bfloat16
from rayline.vision import fcn, pictures, transfer
from rayline.vision.data import make_shape_scenes, read_segmentation_folder
from rayline.vision.predictors import SegmenterService
from rayline.vision.segmentation import FCNConfig


@pytest.mark.blas
def test_learned_upsampling_starts_as_exact_bilinear_interpolation():
    up = fcn.upsampling_layer(1, 2)
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    out = up(torch.tensor([[[[a, b], [c, d]]]]))[0, 0]
    # 1-D taps (0.25, 0.75, 0.75, 0.25): [a, b] -> [.75a, .75a+.25b, .25a+.75b, .75b];
    # the 2-D kernel is their outer product (the edges see zero padding).
    rows = [
        [0.75 * a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, 0.75 * b] for a, b in ((a, b), (c, d))
    ]
    top, bottom = torch.tensor(rows)
    expected = torch.stack(
        [0.75 * top, 0.75 * top + 0.25 * bottom, 0.25 * top + 0.75 * bottom, 0.75 * bottom]
    )
    # float32 convolution against the hand sum: rounding of ~1e-7 on values up to 4
    assert torch.allclose(out, expected, atol=1e-6)
    # Away from the border it is PyTorch's bilinear interpolation, for every FCN factor.
    x = torch.randn(1, 3, 7, 9)
    for factor in (2, 8, 16, 32):
        learned = fcn.upsampling_layer(3, factor)(x)
        reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        assert learned.shape == reference.shape
        inner = (..., slice(factor, -factor), slice(factor, -factor))
        # a transposed convolution sums up to 4 taps per axis in another order than
        # interpolate's lerps: float32 rounding on unit-normal values, under 1e-5
        assert torch.allclose(learned[inner], reference[inner], atol=1e-5), factor
        assert fcn.upsampling_layer(3, factor).weight.requires_grad  # then learned


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_scores_every_pixel_and_starts_at_zero(variant):
    model = fcn.FCN("resnet18", 4, variant).eval()
    scores = model(torch.randn(2, 3, 45, 61))
    assert scores.shape == (2, 4, 45, 61)
    assert torch.count_nonzero(scores) == 0  # zero-initialised score layers
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}[variant]
    # every layer learns: after one step on one image the scores are no longer zero
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randint(0, 4, (2, 64, 64))
    F.cross_entropy(model.train()(torch.randn(2, 3, 64, 64)), target).backward()
    optimizer.step()
    assert torch.count_nonzero(model.eval()(torch.randn(1, 3, 32, 32))) > 0


def test_backbone_weights_come_from_a_state_dict_file(tmp_path):
    torch.manual_seed(3)
    resnet = transfer.pretrained("resnet18", "none")
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    model = fcn.FCN("resnet18", 3, "fcn8s", str(tmp_path / "r18.pth"))
    assert torch.equal(model.stem[0].weight, resnet.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    with pytest.raises(Exception, match="built on a ResNet"):
        fcn.FCN("mobilenet_v3_small", 3)


def test_segmentation_metrics_on_hand_made_masks():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])
    matrix = fcn.confusion(predicted, target, 3)
    # rows are targets: the 0s were predicted 0, 1, 0; the 1s 1, 1; the 2s 2, 0; the 255
    # pixel is not scored
    assert matrix.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    scores = fcn.segmentation_scores(matrix)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    # IoU: class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / 2
    assert scores["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # a class absent from both target and prediction does not count
    assert fcn.segmentation_scores(fcn.confusion(predicted, target, 5))[
        "mean_iou"
    ] == pytest.approx(scores["mean_iou"])


def write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_segmentation_folders_and_their_errors(tmp_path):
    root = make_shape_scenes(tmp_path, count=10, size=32)
    train, valid = read_segmentation_folder(root)
    assert (len(train), len(valid)) == (8, 2)
    assert train.classes == ("background", "circle", "square", "triangle")
    image, mask = train.read(0)
    assert image.size == (32, 32) and mask.shape == (32, 32) and mask.max() <= 3

    bad = tmp_path / "bad"
    with pytest.raises(DataError, match="classes.txt: missing"):
        read_segmentation_folder(str(bad))
    bad.mkdir()
    (bad / "classes.txt").write_text("background\nroad\n")
    with pytest.raises(DataError, match="train/images: no such directory"):
        read_segmentation_folder(str(bad))
    for part in ("train", "val"):
        write_png(bad / part / "images" / "a.png", np.zeros((4, 4, 3)), "RGB")
        write_png(bad / part / "masks" / "a.png", [[0, 1, 255, 1]] * 4, "L")
    write_png(bad / "train" / "images" / "b.png", np.zeros((4, 4, 3)), "RGB")
    with pytest.raises(DataError, match="'b' has no partner"):
        read_segmentation_folder(str(bad))
    write_png(bad / "train" / "masks" / "b.png", [[0, 7, 0, 0]] * 4, "L")
    train, _ = read_segmentation_folder(str(bad))
    assert train.read(0)[1].tolist()[0] == [0, 1, 255, 1]  # 255: not scored
    with pytest.raises(DataError, match="b.png: class index 7 but classes.txt names 2"):
        train.read(1)
    write_png(bad / "train" / "masks" / "b.png", [[0, 1]] * 2, "L")
    with pytest.raises(DataError, match="mask is 2x2, its image 4x4"):
        train.read(1)
    assert cli_main(["data", "make-shape-scenes", str(tmp_path), "--size", "8"]) == 2


@pytest.mark.slow
def test_fcn_run_learns_registers_its_best_epoch_and_segments(ray_session, tmp_path):
    root = make_shape_scenes(tmp_path, count=40, size=48, seed=1)
    # Scored on the images it trains on: 32 images are too few to generalise from scratch,
    # but any working pipeline fits them (the classic overfitting check).
    shutil.rmtree(f"{root}/val")
    shutil.copytree(f"{root}/train", f"{root}/val")
    cfg = from_dict(
        FCNConfig,
        {
            "data": {"path": root, "crop_size": 48},
            "model": {"arch": "resnet18", "weights": "none", "backbone_lr_scale": 1.0},
            "optim": {"optimizer": "adamw", "lr": 0.003},
            # bfloat16 steps in the channels-last layout: it must learn as float32 does, and
            # validation (in float32, the default layout) must be what registration
            # re-scores on a fresh model exactly. (In float32 on a CPU without native
            # bfloat16, where it would take minutes; test_vision checks a bfloat16 step.)
            "train": {
                "epochs": 10,
                "batch_size": 8,
                "precision": "bfloat16" if cpu_has_native_bfloat16() else "float32",
                "channels_last": True,
            },
            "run": {
                "name": "scenes",
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
            },
        },
    )
    outcome = pipelines.run(pipelines.get_pipeline("fcn"), cfg, sweep=False)
    history = outcome.best.metrics_dataframe
    best = outcome.best.metrics["best_valid_mean_iou"]
    assert best == history["valid_mean_iou"].max()
    assert (history["train_images_per_s"] > 0).all()
    # better than the untrained network, which calls every pixel background
    _, valid = read_segmentation_folder(root)
    masks = np.stack([valid.read(i)[1] for i in range(len(valid))])
    background_only = (masks == 0).mean() / len(np.unique(masks))
    assert best > background_only + 0.1, (best, background_only)

    registry = ModelRegistry(str(tmp_path / "store"))
    version = registry.get("scenes", "latest")
    assert version.kind == "segmenter" and version.metrics["best_valid_mean_iou"] == best
    assert set(version.files) == {
        "best.pt",
        "model.json",
        "curves.png",
        "overlay.png",
        "profile.json",
    }
    for name in ("curves.png", "overlay.png"):
        assert Path(outcome.best.path, name).read_bytes() == registry.read_file(version, name)
    with Image.open(io.BytesIO(registry.read_file(version, "overlay.png"))) as overlay:
        assert overlay.format == "PNG"
        assert overlay.size == (3 * pictures.OVERLAY_TILE, 4 * pictures.OVERLAY_TILE)
    registry.promote("scenes", version.version)
    service = SegmenterService(registry, "scenes")
    image = Image.open(valid.images[0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answer = service.predict([base64.b64encode(buffer.getvalue()).decode()])
    assert answer["classes"] == ["background", "circle", "square", "triangle"]
    (segmented,) = answer["predictions"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(segmented["mask_png"]))))
    assert mask.shape == (48, 48) and mask.max() <= 3
    assert sum(segmented["pixels"].values()) == pytest.approx(1.0)
    with pytest.raises(BadInput, match=r"images\[0\]: not an image"):
        service.predict([base64.b64encode(b"text").decode()])
    # Exported to ONNX, the pipeline's FCN gives the served masks on validation scenes.
    from test_export import assert_segmenter_parity, export

    assert export(registry, "scenes", str(version.version), str(tmp_path / "onnx")) == 0
    encoded = []
    for path in valid.images[:4]:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    assert_segmenter_parity(registry, "scenes", version.version, tmp_path / "onnx", encoded)


def test_overlay_colours_classes_and_unscored_pixels():
    """Black image; left half class 1, right half unscored (255) in the true mask; all
    class 2 predicted: the tiles are the image, then each mask blended at half opacity."""
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    truth = np.full((4, 4), 255, dtype=np.uint8)
    truth[:, :2] = 1
    predicted = np.full((4, 4), 2, dtype=np.uint8)
    colours = pictures.palette(3)
    assert colours[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # PASCAL VOC's
    with Image.open(io.BytesIO(pictures.overlay_png([(image, truth, predicted)], 3))) as png:
        drawn = np.asarray(png.convert("RGB"))
    tile = pictures.OVERLAY_TILE
    assert drawn.shape == (tile, 3 * tile, 3)
    assert (drawn[:, :tile] == 0).all()
    assert drawn[0, tile].tolist() == [64, 0, 0]  # class 1 over black
    assert drawn[0, 2 * tile - 1].tolist() == [127, 127, 127]  # unscored: white over black
    assert drawn[0, 2 * tile].tolist() == [0, 64, 0]  # class 2 predicted


def test_curves_show_both_losses_and_the_score():
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "valid_loss": 1.2 / e,
            "valid_mean_iou": e / 5,
            "best_epoch": 3,
        }
        for e in range(1, 4)
    ]
    with Image.open(io.BytesIO(pictures.curves_png(history, "mean_iou"))) as png:
        drawn = np.asarray(png.convert("RGB")).reshape(-1, 3)
        assert png.size == pictures.CURVES_SIZE
    colours = {tuple(c) for c in np.unique(drawn, axis=0).tolist()}
    for colour in (pictures.TRAIN_COLOUR, pictures.VALID_COLOUR, pictures.BEST_COLOUR):
        assert colour in colours


@pytest.mark.blas
def test_fixed_bilinear_upsampling_stays_interpolation_while_the_rest_learns():
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for upsampling, moves in (("learned", True), ("fixed_bilinear", False)):
        model = fcn.FCN("resnet18", 3, "fcn8s", "none", upsampling)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        groups = [g for g in model.parameter_groups(0.1, 1.0) if g["params"]]
        optimizer = torch.optim.SGD(groups, lr=0.1)
        for _ in range(2):
            loss = F.cross_entropy(model(images), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = model.state_dict()
        for name in ("up32.weight", "up16.weight", "up_final.weight"):
            assert (not torch.equal(before[name], after[name])) == moves, (upsampling, name)
        assert not torch.equal(before["score8.weight"], after["score8.weight"])
    with pytest.raises(ConfigError, match="model.upsampling"):
        fcn.FCN("resnet18", 3, "fcn8s", "none", "nearest")


def test_confusion_picture_stays_small_with_many_classes():
    confusion = np.eye(1000, dtype=np.int64) * 3
    data = pictures.confusion_png(confusion, [f"class {i}" for i in range(1000)])
    with Image.open(io.BytesIO(data)) as png:
        assert png.format == "PNG" and max(png.size) <= 110 + pictures.CONFUSION_MAX_SIDE + 10
