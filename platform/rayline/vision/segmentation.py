"""The FCN segmentation pipeline: config, data loading, the Tune trainable and what
registering the best trial needs.

A trial trains an FCN (vision/fcn.py) through the shared epoch loop (vision/training.py),
evaluated on the whole validation images after every epoch and ranked by its best mean
IoU. The registered model is the best epoch's weights, re-scored in the driver first.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np
import torch
from torch import nn

from rayline.config import ConfigError, RunConfig, SweepConfig, bounded, from_dict, named, to_dict
from rayline.fs import fingerprint
from rayline.vision import fcn, training
from rayline.vision.data import SegmentationSet, content_parts, read_segmentation_folder
from rayline.vision.pictures import CURVES_FILE, OVERLAY_FILE, curves_png, overlay_png
from rayline.vision.predictors import image_profile, load_segmenter, profile_sample
from rayline.vision.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    train_transform,
    whole_image_transform,
)
from rayline.vision.served import SERVED
from rayline.vision.training import (
    EpochsConfig,
    OptimConfig,
    ScheduleConfig,
    Scoring,
    vision_pipeline,
)


@dataclasses.dataclass
class SegmentationDataConfig:
    path: str = ""
    """A folder, local or URI, with classes.txt and train/ and val/ folders of images/
    and masks/ (PNGs of class indices; 255 marks pixels not scored)."""
    crop_size: int = bounded(256, ge=32)
    """Side of the random square crops trained on; validation scores whole images."""
    loader_workers: int = bounded(0, ge=0)
    """DataLoader worker processes decoding images (0: in the trial's own process)."""


@dataclasses.dataclass
class FCNModelConfig:
    arch: str = "resnet18"
    """The ResNet backbone: resnet18, resnet34, resnet50, ..."""
    weights: str = "imagenet"
    """The backbone's weights: `imagenet`, `none` or the path/URI of a state_dict."""
    variant: Literal["fcn32s", "fcn16s", "fcn8s"] = "fcn8s"
    """How many skip connections refine the 1/32 scores: none, the 1/16 layer's, or the
    1/16 and 1/8 layers'."""
    backbone_lr_scale: float = bounded(0.1, ge=0.0)
    """The backbone learns at optim.lr * this; the scores and upsampling at optim.lr."""
    upsampling: Literal["learned", "fixed_bilinear"] = "learned"
    """The upsampling layers start as bilinear interpolation and are learned, or stay
    bilinear interpolation (the baseline learned upsampling must beat)."""


@dataclasses.dataclass
class SegmentationRunConfig(RunConfig):
    name: str = named("fcn")


@dataclasses.dataclass
class FCNConfig:
    pipeline: Literal["fcn"] = "fcn"
    """Which pipeline this file configures."""
    data: SegmentationDataConfig = dataclasses.field(default_factory=SegmentationDataConfig)
    model: FCNModelConfig = dataclasses.field(default_factory=FCNModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: EpochsConfig = dataclasses.field(default_factory=EpochsConfig)
    run: SegmentationRunConfig = dataclasses.field(default_factory=SegmentationRunConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    """Search space, e.g. model.variant, optim.lr; with ASHA, budgets count epochs."""


def prepare(cfg: FCNConfig) -> dict:
    """List and pair the images and masks, and build the model once, in the driver."""
    if not cfg.data.path:
        raise ConfigError("data.path: expected a segmentation folder (classes.txt, train/, val/)")
    train, valid = read_segmentation_folder(cfg.data.path)
    build(cfg, len(train.classes))
    return {"train": train, "valid": valid}


def build(cfg: FCNConfig, num_classes: int) -> fcn.FCN:
    return fcn.FCN(
        cfg.model.arch, num_classes, cfg.model.variant, cfg.model.weights, cfg.model.upsampling
    )


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and masks decoded on demand through a joint transform."""

    def __init__(self, pairs: SegmentationSet, transform):
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image, mask = self.pairs.read(index)
        image, mask = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask)))
        return image, mask.as_subclass(torch.Tensor).long()


def valid_loader(cfg: FCNConfig, valid: SegmentationSet):
    # One image per batch: validation images may differ in size.
    return torch.utils.data.DataLoader(
        SegmentationDataset(valid, whole_image_transform()),
        batch_size=1,
        num_workers=cfg.data.loader_workers,
    )


def fcn_trainable(
    config: dict, train: SegmentationSet | None = None, valid: SegmentationSet | None = None
) -> None:
    """Tune function trainable: one FCN configuration for `train.epochs`, ranked by its
    best validation mean IoU."""
    cfg = from_dict(FCNConfig, config)
    device = training.start_trial(cfg.train, cfg.run.seed)
    num_classes = len(train.classes)
    model = build(cfg, num_classes).to(device)
    groups = model.parameter_groups(cfg.optim.lr, cfg.model.backbone_lr_scale)
    optimizer = training.make_optimizer(cfg.optim, groups)
    shuffle = torch.Generator().manual_seed(cfg.run.seed)
    train_loader = torch.utils.data.DataLoader(
        SegmentationDataset(train, train_transform(cfg.data.crop_size)),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=shuffle,
        num_workers=cfg.data.loader_workers,
    )
    valid_loader_ = valid_loader(cfg, valid)
    criterion = nn.CrossEntropyLoss(
        ignore_index=fcn.IGNORE_INDEX, label_smoothing=cfg.optim.label_smoothing
    )
    scorer = nn.CrossEntropyLoss(ignore_index=fcn.IGNORE_INDEX)
    run = training.Training(
        model,
        optimizer,
        training.schedule(optimizer, cfg.schedule, cfg.train.epochs),
        shuffle,
        train_epoch=lambda: fcn.train_one_epoch(
            model,
            criterion,
            optimizer,
            train_loader,
            device,
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
        ),
        evaluate=lambda: fcn.evaluate(model, scorer, valid_loader_, device, num_classes),
    )
    training.run_epochs(run, cfg.train, score="mean_iou", meta=describe(cfg, train))


def image_mean_iou(files: dict[str, bytes], cfg: FCNConfig, valid: SegmentationSet) -> list[float]:
    """Each validation image's mean IoU (over the classes in its mask or its prediction)
    under the saved model, in file order."""
    model, meta = load_segmenter(files)
    classes = len(meta["classes"])
    scores: list[float] = []
    with torch.no_grad():
        for images, masks in valid_loader(cfg, valid):
            predicted = model(images).argmax(1)
            scores.append(
                fcn.segmentation_scores(fcn.confusion(predicted, masks, classes))["mean_iou"]
            )
    return scores


def describe(cfg: FCNConfig, train: SegmentationSet) -> dict:
    """model.json: what serving needs to rebuild the network and its input transform."""
    return {
        "arch": cfg.model.arch,
        "variant": cfg.model.variant,
        "classes": list(train.classes),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "config": to_dict(cfg),
    }


def drift_profile(train: SegmentationSet) -> dict:
    """The training images' brightness, contrast and size, and each mask's commonest
    class (pixels not scored left out)."""
    images, commonest = [], []
    for i in profile_sample(len(train)):
        image, mask = train.read(int(i))
        counts = np.bincount(mask[mask != fcn.IGNORE_INDEX].ravel(), minlength=len(train.classes))
        images.append(image)
        commonest.append(int(counts[: len(train.classes)].argmax()))
    return image_profile(images, commonest, len(train.classes))


def score_files(files: dict[str, bytes], cfg: FCNConfig, valid: SegmentationSet) -> dict:
    """What the saved best model scores on the validation images, here and now."""
    model, meta = load_segmenter(files)
    scorer = nn.CrossEntropyLoss(ignore_index=fcn.IGNORE_INDEX)
    return fcn.evaluate(
        model, scorer, valid_loader(cfg, valid), torch.device("cpu"), len(meta["classes"])
    )


OVERLAY_IMAGES = 4
"""Validation images drawn with their true and predicted masks."""


def pictures(
    files: dict[str, bytes], cfg: FCNConfig, valid: SegmentationSet, history: list[dict]
) -> dict[str, bytes]:
    """The learning curves, and the first validation images with their true masks and
    the saved best model's predictions."""
    model, meta = load_segmenter(files)
    dataset = SegmentationDataset(valid, whole_image_transform())
    rows = []
    with torch.no_grad():
        for index in range(min(OVERLAY_IMAGES, len(valid))):
            image, mask = valid.read(index)
            tensor, _ = dataset[index]
            predicted = model(tensor[None]).argmax(1)[0].numpy().astype(np.uint8)
            rows.append((np.asarray(image.convert("RGB")), mask, predicted))
    return {
        CURVES_FILE: curves_png(history, "mean_iou"),
        OVERLAY_FILE: overlay_png(rows, len(meta["classes"])),
    }


def data_fingerprint(*sets: SegmentationSet) -> str:
    """The images' and masks' bytes, the class names and each file's place in each set."""
    parts: list[str] = []
    for pairs in sets:
        parts += [json.dumps(pairs.classes)]
        parts += content_parts(pairs.uri, pairs.images) + content_parts(pairs.uri, pairs.masks)
    return fingerprint(*parts)


PIPELINE = vision_pipeline(
    "fcn",
    FCNConfig,
    fcn_trainable,
    "segmenter",
    "mean_iou",
    prepare=prepare,
    scoring=Scoring(
        score_files,
        pictures,
        drift_profile,
        data_fingerprint,
        read_data=lambda cfg: read_segmentation_folder(cfg.data.path),
        per_image=image_mean_iou,
    ),
    serves={"segmenter": SERVED["segmenter"]},
)
