"""The transfer-learning pipeline: config, the Tune trainable and what registering the
best trial needs.

A trial trains for `train.epochs`, evaluating on the validation images after each epoch,
and keeps the best epoch's weights (best-model saving). Every report carries a checkpoint
holding those best weights (best.pt), the model's description (model.json) and what
resuming needs (state.pt: the current weights, optimiser, schedule and counters). The
trial is ranked by its best validation accuracy, and the registered model is best.pt,
re-scored in the driver before it is registered (ray-project/ray#20267).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rayline.config import ConfigError, RunConfig, SweepConfig, bounded, from_dict, to_dict
from rayline.store import fingerprint
from rayline.vision import transfer
from rayline.vision.data import ImageSet, read_image_folder
from rayline.vision.presets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

BEST_FILE = "best.pt"
META_FILE = "model.json"
STATE_FILE = "state.pt"


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


@dataclasses.dataclass
class BackboneConfig:
    arch: str = "resnet18"
    """A torchvision classification model: resnet18, mobilenet_v3_small, efficientnet_b0..."""
    weights: str = "imagenet"
    """`imagenet` (torchvision's pretrained weights, downloaded once into $TORCH_HOME),
    `none` (random: training from scratch), or the path/URI of a state_dict for `arch`."""
    mode: Literal["finetune", "feature_extract"] = "finetune"
    """`finetune` trains every layer; `feature_extract` freezes the backbone (weights and
    batch-norm statistics) and trains only the new classifier head."""


@dataclasses.dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with momentum, as torchvision's reference, or AdamW."""
    lr: float = bounded(0.01, gt=0.0)
    """The head's learning rate."""
    backbone_lr_scale: float = bounded(0.1, ge=0.0)
    """Fine-tuning: the backbone learns at lr * this."""
    momentum: float = bounded(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    weight_decay: float = bounded(1e-4, ge=0.0)
    label_smoothing: float = bounded(0.0, ge=0.0, lt=1.0)


@dataclasses.dataclass
class ScheduleConfig:
    kind: Literal["constant", "step", "cosine"] = "cosine"
    """Per-epoch learning-rate schedule after the warm-up."""
    warmup_epochs: int = bounded(0, ge=0)
    """Epochs of linear warm-up from 0.1 x lr."""
    step_size: int = bounded(10, ge=1)
    """`step`: epochs between decays."""
    gamma: float = bounded(0.1, gt=0.0, le=1.0)
    """`step`: the decay factor."""


@dataclasses.dataclass
class EpochsConfig:
    epochs: int = bounded(10, ge=1)
    """Passes over the training images; also ASHA's budget unit."""
    batch_size: int = bounded(32, ge=1)
    threads: int = bounded(1, ge=1)
    """torch threads per trial; the trial reserves as many CPUs."""
    gpus: float = bounded(0.0, ge=0.0)
    """GPUs per trial; the trial trains on `cuda` whenever it sees one."""
    checkpoint_every: int = bounded(1, ge=1)
    """Epochs between checkpoints (each holds the weights twice and the optimiser state);
    an epoch that improves the best score and the last epoch are always checkpointed."""


@dataclasses.dataclass
class TransferRunConfig(RunConfig):
    name: str = "transfer"


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
    transfer.build_model(cfg.model.arch, len(train.classes), cfg.model.weights)
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
        ImageDataset(train, train_transform(d.crop_size)),
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


def make_optimizer(cfg: TransferConfig, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def transfer_trainable(
    config: dict, train: ImageSet | None = None, valid: ImageSet | None = None
) -> None:
    """Tune function trainable: train one configuration for `train.epochs`, reporting
    after every epoch with a checkpoint; resumes from the last one when there is one."""
    from ray import tune

    cfg = from_dict(TransferConfig, config)
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.run.seed)
    # Ray hides the GPUs from a trial that reserved none.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, head = transfer.build_model(cfg.model.arch, len(train.classes), cfg.model.weights)
    transfer.prepare_mode(model, head, cfg.model.mode)
    model.to(device)
    optimizer = make_optimizer(
        cfg,
        transfer.parameter_groups(
            model, head, cfg.model.mode, cfg.optim.lr, cfg.optim.backbone_lr_scale
        ),
    )
    s = cfg.schedule
    scheduler = transfer.make_scheduler(
        optimizer, s.kind, cfg.train.epochs, s.warmup_epochs, s.step_size, s.gamma
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    scorer = nn.CrossEntropyLoss()
    best = {"valid_accuracy": -1.0, "valid_loss": float("inf"), "epoch": 0}
    best_weights = None
    start_epoch = 0
    shuffle = torch.Generator().manual_seed(cfg.run.seed)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory, STATE_FILE), map_location=device, weights_only=True)
            best_weights = torch.load(
                Path(directory, BEST_FILE), map_location="cpu", weights_only=True
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The shuffles and augmentations go on as if the trial had never stopped.
        torch.set_rng_state(state["torch_rng"])
        shuffle.set_state(state["shuffle_rng"])
        start_epoch, best = state["epoch"], state["best"]
    train_loader, valid_loader_ = loaders(cfg, train, valid, shuffle)
    meta = describe(cfg, train)
    for epoch in range(start_epoch, cfg.train.epochs):
        lr = optimizer.param_groups[0]["lr"]
        trained = transfer.train_one_epoch(
            model, head, cfg.model.mode, criterion, optimizer, train_loader, device
        )
        scored = transfer.evaluate(model, scorer, valid_loader_, device)
        scheduler.step()
        improved = scored["accuracy"] > best["valid_accuracy"] or (
            scored["accuracy"] == best["valid_accuracy"] and scored["loss"] < best["valid_loss"]
        )
        if improved:
            best = {"valid_accuracy": scored["accuracy"], "valid_loss": scored["loss"]}
            best["epoch"] = epoch + 1
            best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": trained["loss"],
            "train_accuracy": trained["accuracy"],
            "valid_loss": scored["loss"],
            "valid_accuracy": scored["accuracy"],
            "best_valid_accuracy": best["valid_accuracy"],
            "best_valid_loss": best["valid_loss"],
            "best_epoch": best["epoch"],
        }
        # Every improvement is checkpointed, so the latest checkpoint always holds the
        # weights behind the best score reported so far.
        last = epoch + 1 == cfg.train.epochs
        if not (improved or last or (epoch + 1) % cfg.train.checkpoint_every == 0):
            tune.report(metrics)
            continue
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "shuffle_rng": shuffle.get_state(),
            "epoch": epoch + 1,
            "best": best,
        }
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, Path(directory, STATE_FILE))
            torch.save(best_weights, Path(directory, BEST_FILE))
            Path(directory, META_FILE).write_text(json.dumps({**meta, "best": best}, indent=1))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


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


def load_classifier(files: dict[str, bytes]) -> tuple[nn.Module, dict]:
    """The network saved as best.pt + model.json, in eval mode on the CPU."""
    meta = json.loads(files[META_FILE])
    model, _ = transfer.build_model(meta["arch"], len(meta["classes"]), "none")
    state = torch.load(io.BytesIO(files[BEST_FILE]), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def score_files(files: dict[str, bytes], cfg: TransferConfig, valid: ImageSet) -> dict[str, float]:
    """What the saved best model scores on the validation images, here and now."""
    model, _ = load_classifier(files)
    return transfer.evaluate(
        model, nn.CrossEntropyLoss(), valid_loader(cfg, valid), torch.device("cpu")
    )


def image_set_fingerprint(*sets: ImageSet) -> str:
    parts: list[str] = []
    for images in sets:
        parts += [json.dumps([images.classes, images.labels]), *images.paths]
    return fingerprint(*parts)


def trial_resources(cfg: TransferConfig) -> dict:
    resources = {"cpu": cfg.train.threads}
    if cfg.train.gpus:
        resources["gpu"] = cfg.train.gpus
    return resources


def read_checkpoint(directory: str) -> dict[str, bytes]:
    """The files a registered model keeps: the best weights and their description."""
    return {name: Path(directory, name).read_bytes() for name in (BEST_FILE, META_FILE)}
