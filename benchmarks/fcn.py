"""Do FCN's skips and learned upsampling pay? FCN-32s, FCN-16s, FCN-8s and FCN-8s with
fixed (frozen) bilinear upsampling, trained on the same scenes with the same budget
(issue #14).

    .venv/bin/python benchmarks/fcn.py [--steps 300] [--seeds 2] [--batch-size 8] [--lr 0.005]

The scenes (fixed seed, made in memory): 128x128 images on a textured background
(random stripes plus noise) holding small discs, small squares and thin bars (3-6 pixels
wide, any angle), a class each, every object tinted near its class's hue. At output
stride 32 a whole object can fall inside one score cell, so the result rests on where
the boundaries go: what skips and upsampling are for. Every variant trains the same
rayline FCN (resnet18 backbone from random weights, AdamW, cosine schedule) for --steps
batches, on both seeds, then is scored on 64 held-out scenes with rayline's metrics
(vision/fcn.py): mean IoU, per-class IoU, pixel accuracy; and timed: train seconds and
inference images/s (batch 16, eval mode). 400 training scenes.

Targets: FCN-8s mean IoU >= 0.85; FCN-8s >= FCN-32s + 0.03; learned >= fixed bilinear.
Last stdout line: {"variants": {"fcn32s"|"fcn16s"|"fcn8s"|"fcn8s_fixed_bilinear":
{"miou", "pixel_acc", "per_class_iou", "train_s", "infer_images_per_s", "miou_by_seed"}},
"targets": {...}, "steps", "batch_size", "threads", "device"}
"""

import argparse
import json
import math
import time

import numpy as np
import torch

from common import log

SIZE = 128
CLASSES = ("background", "disc", "square", "bar")
HUES = {1: (220, 60, 60), 2: (60, 200, 60), 3: (60, 90, 230)}
VARIANTS = {
    "fcn32s": ("fcn32s", "learned"),
    "fcn16s": ("fcn16s", "learned"),
    "fcn8s": ("fcn8s", "learned"),
    "fcn8s_fixed_bilinear": ("fcn8s", "fixed_bilinear"),
}


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (3, SIZE, SIZE) float image in [0, 1] and its (SIZE, SIZE) class mask."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
    base = rng.uniform(90, 170, 3)
    background = base + 25 * stripes[..., None] + rng.normal(0, 10, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(rng.integers(3, 8)):
        label = int(rng.integers(1, 4))
        colour = tuple(
            int(c) for c in np.clip(np.array(HUES[label]) + rng.integers(-30, 30, 3), 0, 255)
        )
        cx, cy = rng.uniform(8, SIZE - 8, 2)
        if label == 1:
            r = rng.uniform(4, 10)
            box = (cx - r, cy - r, cx + r, cy + r)
            draw_image.ellipse(box, fill=colour)
            draw_mask.ellipse(box, fill=label)
        elif label == 2:
            h = rng.uniform(3, 8)
            box = (cx - h, cy - h, cx + h, cy + h)
            draw_image.rectangle(box, fill=colour)
            draw_mask.rectangle(box, fill=label)
        else:
            length, turn = rng.uniform(20, 60), rng.uniform(0, math.pi)
            dx, dy = length / 2 * math.cos(turn), length / 2 * math.sin(turn)
            width = int(rng.integers(3, 7))
            line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
            draw_image.line(line, fill=colour, width=width)
            draw_mask.line(line, fill=label, width=width)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0, np.asarray(mask)


def scenes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    pairs = [scene(rng) for _ in range(count)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    mean, std = images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std, torch.from_numpy(np.stack([p[1] for p in pairs])).long()


def train_and_score(variant, upsampling, seed, train, test, args) -> dict:
    from rayline.vision import fcn
    from rayline.vision.training import make_scheduler

    torch.manual_seed(seed)
    model = fcn.FCN("resnet18", len(CLASSES), variant, "none", upsampling)
    groups = [g for g in model.parameter_groups(args.lr, 1.0) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, "cosine", args.steps, warmup_epochs=args.steps // 20)
    criterion = torch.nn.CrossEntropyLoss()
    images, masks = train
    order = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch_size,), generator=order)
        flip = torch.rand(()) < 0.5
        x, y = images[batch], masks[batch]
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # per step: the schedule spans the budget
        if (step + 1) % max(1, args.steps // 4) == 0:
            log(f"    {variant}/{upsampling} seed {seed}: step {step + 1} loss {loss.item():.4f}")
    train_s = time.perf_counter() - started
    model.eval()
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(test[0]), 16):
            scores = model(test[0][first : first + 16])
            matrix += fcn.confusion(scores.argmax(1), test[1][first : first + 16], len(CLASSES))
    infer_s = time.perf_counter() - started
    hits = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - hits
    return {
        **fcn.segmentation_scores(matrix),
        "per_class_iou": (hits / union.clamp(min=1)).tolist(),
        "train_s": train_s,
        "infer_images_per_s": len(test[0]) / infer_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--train-scenes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", type=lambda t: t.split(","), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log(f"making {args.train_scenes} training and 64 test scenes ...")
    train, test = scenes(args.train_scenes, seed=1), scenes(64, seed=2)
    variants = {}
    for name in args.variants:
        variant, upsampling = VARIANTS[name]
        runs = []
        for seed in range(args.seeds):
            runs.append(train_and_score(variant, upsampling, seed, train, test, args))
            log(
                f"  {name} seed {seed}: mIoU {runs[-1]['mean_iou']:.4f} in {runs[-1]['train_s']:.0f} s"
            )
        variants[name] = {
            "miou": round(float(np.mean([r["mean_iou"] for r in runs])), 4),
            "pixel_acc": round(float(np.mean([r["pixel_accuracy"] for r in runs])), 4),
            "per_class_iou": dict(
                zip(
                    CLASSES,
                    np.round(np.mean([r["per_class_iou"] for r in runs], axis=0), 4).tolist(),
                )
            ),
            "train_s": round(float(np.mean([r["train_s"] for r in runs])), 1),
            "infer_images_per_s": round(float(np.mean([r["infer_images_per_s"] for r in runs])), 1),
            "miou_by_seed": [round(r["mean_iou"], 4) for r in runs],
        }
    miou = {name: v["miou"] for name, v in variants.items()}
    targets = (
        {}
        if set(miou) != set(VARIANTS)
        else {
            "fcn8s_miou_at_least_0.85": miou["fcn8s"] >= 0.85,
            "fcn8s_minus_fcn32s": round(miou["fcn8s"] - miou["fcn32s"], 4),
            "fcn8s_beats_fcn32s_by_0.03": miou["fcn8s"] >= miou["fcn32s"] + 0.03,
            "learned_minus_fixed_bilinear": round(miou["fcn8s"] - miou["fcn8s_fixed_bilinear"], 4),
            "learned_at_least_fixed_bilinear": miou["fcn8s"] >= miou["fcn8s_fixed_bilinear"],
        }
    )
    print(
        json.dumps(
            {
                "variants": variants,
                "targets": targets,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
