"""The image-classification pipeline (transfer learning): config, data loading, the Tune
trainable and what registering the best trial needs.

A trial trains for `train.epochs` through the shared epoch loop (vision/training.py):
evaluated after every epoch, ranked by its best validation accuracy, its best epoch's
weights kept as best.pt. The registered model is that best.pt, re-scored in the driver
before it is registered (ray-project/ray#20267).
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
from rayline.vision import training, transfer
from rayline.vision.data import ImageSet, content_parts, read_image_folder
from rayline.vision.pictures import CONFUSION_FILE, CURVES_FILE, confusion_png, curves_png
from rayline.vision.predictors import image_profile, load_classifier, profile_sample
from rayline.vision.presets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from rayline.vision.served import SERVED
from rayline.vision.training import (
    META_FILE,
    EpochsConfig,
    OptimConfig,
    ScheduleConfig,
    Scoring,
    vision_pipeline,
)


@dataclasses.dataclass
class ImageDataConfig:
    path: str = ""
    """An image folder, local or URI: train/<class>/ and val/<class>/, or <class>/ folders
    split by `valid_fraction`."""
    valid_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of each class held out for validation when there is no val/ folder."""
    split_seed: int = 0
    """Seeds that split."""
    crop_size: int = bounded(224, ge=16)
    """Side of the square the network sees (torchvision's backbones were trained at 224)."""
    resize_size: int = bounded(0, ge=0)
    """Evaluation resizes the shorter side to this before the centre crop; 0 means
    crop_size * 256 / 224, as in torchvision's reference."""
    loader_workers: int = bounded(0, ge=0)
    """DataLoader worker processes decoding images (0: in the trial's own process)."""
    horizontal_flip: bool = True
    """Mirror training images at random; off for digits, text and whatever else a mirror
    turns into something else."""


@dataclasses.dataclass
class BackboneConfig:
    arch: str = "resnet18"
    """A torchvision classification model: resnet18, mobilenet_v3_small, efficientnet_b0..."""
    weights: str = "imagenet"
    """`imagenet` (torchvision's pretrained weights, downloaded once into $TORCH_HOME),
    `none` (random: training from scratch), `registry://NAME@ALIAS` or `@VERSION` (the
    backbone of a classifier registered in run.store_uri, e.g. one pretrained by this
    pipeline on a source data set; its head is replaced), or the path/URI of a
    state_dict for `arch`."""
    mode: Literal["finetune", "feature_extract", "partial"] = "finetune"
    """`finetune` trains every layer; `feature_extract` freezes the backbone (weights and
    batch-norm statistics) and trains only the new classifier head; `partial` trains the
    head and the backbone's last `trainable_stages` stages, the earlier ones frozen."""
    trainable_stages: int = bounded(1, ge=1)
    """`partial`: how many of the backbone's last stages train (ResNet's stages: conv1,
    bn1, layer1..layer4; MobileNet's, EfficientNet's, ConvNeXt's: the blocks of
    `features`)."""
    adapt_batch_norm: bool = False
    """Before training, re-estimate every batch-norm layer's running statistics on the
    training images (AdaBN): the frozen layers of `feature_extract` and `partial` then
    normalise the new data by its own statistics, their weights still the source's."""


@dataclasses.dataclass
class TransferRunConfig(RunConfig):
    name: str = named("transfer")


@dataclasses.dataclass
class TransferConfig:
    pipeline: Literal["transfer"] = "transfer"
    """Which pipeline this file configures."""
    data: ImageDataConfig = dataclasses.field(default_factory=ImageDataConfig)
    model: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: EpochsConfig = dataclasses.field(default_factory=EpochsConfig)
    run: TransferRunConfig = dataclasses.field(default_factory=TransferRunConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    """Search space, e.g. model.mode, optim.lr, schedule.kind; with ASHA, budgets count
    epochs."""


def resize_size(data: ImageDataConfig) -> int:
    return data.resize_size or round(data.crop_size * 256 / 224)


def prepare(cfg: TransferConfig) -> dict:
    """List and check the images and the model in the driver (missing folders, empty
    classes, bad weights fail here); trials get the file lists and read the images."""
    if not cfg.data.path:
        raise ConfigError("data.path: expected an image folder (one sub-folder per class)")
    train, valid = read_image_folder(cfg.data.path, cfg.data.valid_fraction, cfg.data.split_seed)
    # An unknown arch, unreachable pretrained weights or a weights file that does not fit
    # fail here, once, not in every trial (this also fills this machine's weights cache).
    model, head = transfer.build_model(
        cfg.model.arch, len(train.classes), cfg.model.weights, cfg.run.store_uri
    )
    transfer.frozen_modules(model, head, cfg.model.mode, cfg.model.trainable_stages)
    return {"train": train, "valid": valid}


class ImageDataset(torch.utils.data.Dataset):
    """An ImageSet decoded on demand through a transform."""

    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images.read(index)), self.images.labels[index]


def loaders(cfg: TransferConfig, train: ImageSet, valid: ImageSet, shuffle: torch.Generator):
    """Training batches in the order `shuffle` draws, and validation batches in file order."""
    d = cfg.data
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(train, train_transform(d.crop_size, d.horizontal_flip)),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=shuffle,
        num_workers=d.loader_workers,
    )
    return train_loader, valid_loader(cfg, valid)


def valid_loader(cfg: TransferConfig, valid: ImageSet):
    return torch.utils.data.DataLoader(
        ImageDataset(valid, eval_transform(cfg.data.crop_size, resize_size(cfg.data))),
        batch_size=cfg.train.batch_size,
        num_workers=cfg.data.loader_workers,
    )


def transfer_trainable(
    config: dict, train: ImageSet | None = None, valid: ImageSet | None = None
) -> None:
    """Tune function trainable: one configuration for `train.epochs`, ranked by its best
    validation accuracy (see vision/training.py for the epoch loop and its checkpoints)."""
    cfg = from_dict(TransferConfig, config)
    device = training.start_trial(cfg.train, cfg.run.seed)
    model, head = transfer.build_model(
        cfg.model.arch, len(train.classes), cfg.model.weights, cfg.run.store_uri
    )
    transfer.prepare_mode(model, head, cfg.model.mode, cfg.model.trainable_stages)
    model.to(device)
    if cfg.model.adapt_batch_norm:  # a resumed trial's checkpoint then restores its own
        # The training images as validation reads them: in file order, unaugmented, so
        # no draw from the generators that order and augment training.
        transfer.adapt_batch_norm(model, valid_loader(cfg, train), device)
    groups = transfer.parameter_groups(
        model, head, cfg.model.mode, cfg.optim.lr, cfg.optim.backbone_lr_scale
    )
    optimizer = training.make_optimizer(cfg.optim, groups)
    shuffle = torch.Generator().manual_seed(cfg.run.seed)
    train_loader, valid_loader_ = loaders(cfg, train, valid, shuffle)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    mode, stages = cfg.model.mode, cfg.model.trainable_stages
    run = training.Training(
        model,
        optimizer,
        training.schedule(optimizer, cfg.schedule, cfg.train.epochs),
        shuffle,
        train_epoch=lambda: transfer.train_one_epoch(
            model,
            head,
            mode,
            criterion,
            optimizer,
            train_loader,
            device,
            stages,
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
        ),
        evaluate=lambda: transfer.evaluate(model, nn.CrossEntropyLoss(), valid_loader_, device),
    )
    training.run_epochs(run, cfg.train, score="accuracy", meta=describe(cfg, train))


def describe(cfg: TransferConfig, train: ImageSet) -> dict:
    """model.json: what serving needs to rebuild the network and its input transform."""
    return {
        "arch": cfg.model.arch,
        "classes": list(train.classes),
        "crop_size": cfg.data.crop_size,
        "resize_size": resize_size(cfg.data),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "mode": cfg.model.mode,
        "weights": cfg.model.weights,
        "config": to_dict(cfg),
    }


def score_files(files: dict[str, bytes], cfg: TransferConfig, valid: ImageSet) -> dict[str, float]:
    """What the saved best model scores on the validation images, here and now."""
    model, _ = load_classifier(files)
    return transfer.evaluate(
        model, nn.CrossEntropyLoss(), valid_loader(cfg, valid), torch.device("cpu")
    )


def drift_profile(train: ImageSet) -> dict:
    """The training images' brightness, contrast and size, and the class prior."""
    sample = profile_sample(len(train))
    images = [train.read(int(i)) for i in sample]
    return image_profile(images, [train.labels[i] for i in sample], len(train.classes))


def confusion_matrix(files: dict[str, bytes], cfg: TransferConfig, valid: ImageSet) -> np.ndarray:
    """The saved model on the validation images: counts by (true class, predicted class)."""
    model, meta = load_classifier(files)
    n_classes = len(meta["classes"])
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    with torch.no_grad():
        for images, targets in valid_loader(cfg, valid):
            np.add.at(confusion, (targets.numpy(), model(images).argmax(1).numpy()), 1)
    return confusion


def image_correct(files: dict[str, bytes], cfg: TransferConfig, valid: ImageSet) -> list[float]:
    """1.0 for each validation image (in file order) the saved model classifies right."""
    model, _ = load_classifier(files)
    correct: list[float] = []
    with torch.no_grad():
        for images, targets in valid_loader(cfg, valid):
            correct += (model(images).argmax(1) == targets).double().tolist()
    return correct


def pictures(
    files: dict[str, bytes], cfg: TransferConfig, valid: ImageSet, history: list[dict]
) -> dict[str, bytes]:
    """The learning curves, and the saved best model's confusion matrix on the
    validation images."""
    classes = json.loads(files[META_FILE])["classes"]
    return {
        CURVES_FILE: curves_png(history, "accuracy"),
        CONFUSION_FILE: confusion_png(confusion_matrix(files, cfg, valid), classes),
    }


def data_fingerprint(*sets: ImageSet) -> str:
    """The images' bytes, their class labels and their place in each set."""
    parts: list[str] = []
    for images in sets:
        parts += [json.dumps([images.classes, images.labels])]
        parts += content_parts(images.uri, images.paths)
    return fingerprint(*parts)


PIPELINE = vision_pipeline(
    "transfer",
    TransferConfig,
    transfer_trainable,
    "image_classifier",
    "accuracy",
    prepare=prepare,
    scoring=Scoring(
        score_files,
        pictures,
        drift_profile,
        data_fingerprint,
        read_data=lambda cfg: read_image_folder(
            cfg.data.path, cfg.data.valid_fraction, cfg.data.split_seed
        ),
        per_image=image_correct,
    ),
    serves={"image_classifier": SERVED["image_classifier"]},
)
