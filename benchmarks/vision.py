"""The vision pipelines against the same training as a plain PyTorch loop in one process.

    .venv/bin/python benchmarks/vision.py [--epochs 6] [--threads 2]

Transfer learning (ResNet-18 on `make-shapes`, 64 px, 144 training images) and FCN-8s
(ResNet-18 on `make-shape-scenes`, 64 px, 160 training scenes), both from scratch (no
weights can be downloaded here), trained for the same epochs with the same data,
transforms, model, optimiser, schedule, seed and torch threads two ways: (a) a plain
loop calling the same train and evaluate passes, as a script would, with no reports and
no checkpoints; (b) `rayline train` as one Tune trial (reports, best-epoch saving,
a checkpoint per improving epoch). Walls exclude starting Ray, which a cluster has
already done. On a GPU both use it.

Last stdout line: {"device", "threads", "epochs", "transfer": {...}, "fcn": {...}} with,
per pipeline, "plain_epoch_s" and "rayline_epoch_s" (median epoch), "epoch_ratio",
"plain_wall_s", "rayline_wall_s", "wall_ratio", "plain_best" and "rayline_best" (best
validation accuracy or mean IoU), "checkpoint_mb" (one checkpoint's size), and
"speedups": the plain loop again per `train.precision` x `train.channels_last`
setting, {"float32"|"float32_channels_last"|"bfloat16"|"bfloat16_channels_last":
{"train_images_per_s" (median epoch), "best"}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from common import emit, log

SPEEDUPS = {  # train.precision, train.channels_last
    "float32": ("float32", False),
    "float32_channels_last": ("float32", True),
    "bfloat16": ("bfloat16", False),
    "bfloat16_channels_last": ("bfloat16", True),
}


def plain_transfer(cfg, train, valid, device) -> tuple[list[float], float, float]:
    from rayline.vision import training, transfer
    from rayline.vision.classification import loaders

    torch.manual_seed(cfg.run.seed)
    model, head = transfer.build_model(cfg.model.arch, len(train.classes), cfg.model.weights)
    model.to(device)
    groups = transfer.parameter_groups(model, head, "finetune", cfg.optim.lr, 1.0)
    optimizer = training.make_optimizer(cfg.optim, groups)
    scheduler = training.schedule(optimizer, cfg.schedule, cfg.train.epochs)
    train_loader, valid_loader = loaders(
        cfg, train, valid, torch.Generator().manual_seed(cfg.run.seed)
    )
    criterion = nn.CrossEntropyLoss()
    epochs, best, speeds = [], 0.0, []
    for _ in range(cfg.train.epochs):
        started = time.perf_counter()
        trained = transfer.train_one_epoch(
            model,
            head,
            "finetune",
            criterion,
            optimizer,
            train_loader,
            device,
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
        )
        best = max(best, transfer.evaluate(model, criterion, valid_loader, device)["accuracy"])
        scheduler.step()
        epochs.append(time.perf_counter() - started)
        speeds.append(trained["images_per_s"])
    return epochs, best, statistics.median(speeds)


def plain_fcn(cfg, train, valid, device) -> tuple[list[float], float, float]:
    from rayline.vision import fcn, training
    from rayline.vision.presets import train_transform
    from rayline.vision.segmentation import SegmentationDataset, build, valid_loader

    torch.manual_seed(cfg.run.seed)
    model = build(cfg, len(train.classes)).to(device)
    optimizer = training.make_optimizer(cfg.optim, [{"params": model.parameters()}])
    scheduler = training.schedule(optimizer, cfg.schedule, cfg.train.epochs)
    train_loader = torch.utils.data.DataLoader(
        SegmentationDataset(train, train_transform(cfg.data.crop_size)),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.run.seed),
    )
    valid_batches = valid_loader(cfg, valid)
    criterion = nn.CrossEntropyLoss(ignore_index=fcn.IGNORE_INDEX)
    classes = len(train.classes)
    epochs, best, speeds = [], 0.0, []
    for _ in range(cfg.train.epochs):
        started = time.perf_counter()
        trained = fcn.train_one_epoch(
            model,
            criterion,
            optimizer,
            train_loader,
            device,
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
        )
        scored = fcn.evaluate(model, criterion, valid_batches, device, classes)
        best = max(best, scored["mean_iou"])
        scheduler.step()
        epochs.append(time.perf_counter() - started)
        speeds.append(trained["images_per_s"])
    return epochs, best, statistics.median(speeds)


def compare(name: str, settings: dict, plain, workdir: str, score: str) -> dict:
    from rayline import config as configlib
    from rayline import pipelines

    pipeline = pipelines.get_pipeline(name)
    cfg = configlib.from_dict(pipeline.config_cls, settings)
    prepared = pipelines.prepare(pipeline, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.train.threads)
    log(f"[{name}] (a) plain loop, {cfg.train.epochs} epochs")
    started = time.perf_counter()
    plain_epochs, plain_best, _ = plain(
        cfg, prepared.inputs["train"], prepared.inputs["valid"], device
    )
    plain_wall = time.perf_counter() - started
    speedups = {}
    for setting, (precision, channels_last) in SPEEDUPS.items():
        log(f"[{name}] plain loop, {setting}")
        variant = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, precision=precision, channels_last=channels_last),
        )
        _, best, images_per_s = plain(
            variant, prepared.inputs["train"], prepared.inputs["valid"], device
        )
        speedups[setting] = {"train_images_per_s": round(images_per_s, 1), "best": round(best, 4)}
    log(f"[{name}] (b) rayline train")
    started = time.perf_counter()
    outcome = pipelines.run(pipeline, cfg, sweep=False, prepared=prepared)
    rayline_wall = time.perf_counter() - started
    history = outcome.best.metrics_dataframe
    rayline_epoch = statistics.median(history["time_this_iter_s"])
    plain_epoch = statistics.median(plain_epochs)
    checkpoint = outcome.best.checkpoint.path
    size = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint))
    return {
        "plain_epoch_s": round(plain_epoch, 3),
        "rayline_epoch_s": round(rayline_epoch, 3),
        "epoch_ratio": round(rayline_epoch / plain_epoch, 3),
        "plain_wall_s": round(plain_wall, 2),
        "rayline_wall_s": round(rayline_wall, 2),
        "wall_ratio": round(rayline_wall / plain_wall, 3),
        "plain_best": round(plain_best, 4),
        "rayline_best": round(outcome.best.metrics[f"best_valid_{score}"], 4),
        "checkpoint_mb": round(size / 2**20, 1),
        "speedups": speedups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from rayline.testing import init_local_ray
    from rayline.vision.data import make_shape_scenes, make_shapes

    init_local_ray(num_cpus=max(os.cpu_count() or 1, args.threads))
    common = {
        "model": {"arch": "resnet18", "weights": "none"},
        "optim": {"optimizer": "adamw", "lr": 0.002},
        "schedule": {"kind": "cosine"},
        "train": {"epochs": args.epochs, "batch_size": 16, "threads": args.threads},
    }
    with tempfile.TemporaryDirectory() as workdir:
        run = {"storage_path": f"{workdir}/results", "store_uri": f"{workdir}/store"}
        shapes = make_shapes(workdir, per_class=60, size=64)
        scenes = make_shape_scenes(workdir, count=200, size=64)
        report = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": args.threads,
            "epochs": args.epochs,
        }
        report["transfer"] = compare(
            "transfer",
            {
                **common,
                "model": {**common["model"], "mode": "finetune"},
                "optim": {**common["optim"], "backbone_lr_scale": 1.0},
                "data": {"path": shapes, "crop_size": 64, "resize_size": 64},
                "run": {**run, "name": "transfer"},
            },
            plain_transfer,
            workdir,
            "accuracy",
        )
        log(f"[transfer] {json.dumps(report['transfer'])}")
        report["fcn"] = compare(
            "fcn",
            {
                **common,
                "model": {**common["model"], "backbone_lr_scale": 1.0},
                "data": {"path": scenes, "crop_size": 64},
                "run": {**run, "name": "fcn"},
            },
            plain_fcn,
            workdir,
            "mean_iou",
        )
        log(f"[fcn] {json.dumps(report['fcn'])}")
    emit(report)


if __name__ == "__main__":
    main()
