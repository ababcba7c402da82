"""Does transfer pay? The "new camera" protocol on scikit-learn's bundled digits
(issue #14).

    .venv/bin/python benchmarks/transfer.py [--archs resnet18,shufflenet_v2_x0_5]
        [--seeds 3] [--steps 100] [--source-epochs 40] [--lrs 1e-4,3e-4,...,3e-2]

The small backbone is ShuffleNetV2 x0.5 (1.4M parameters). Not MobileNetV3: torchvision
builds it with batch-norm momentum 0.01, so after a short pretraining from scratch its
running statistics are still near their initial values and in eval mode it scores
chance (0.10 on the source's validation images, measured); its partial and feature
extraction modes are tested in tests/test_vision.py all the same.

Data: the 1,797 8x8 digits, 0..16 scaled to 0..255 and upsized to 32x32 (bilinear),
split by a seeded permutation into two disjoint halves of images.
- Source: the first half as is, all 10 classes. rayline's transfer pipeline trains each
  backbone on it from random weights for --source-epochs (40; ShuffleNet's source scored
  0.889 on its validation images after 15, 0.967 after 40), no mirroring (a mirrored
  digit is another shape), and registers it as `digits-source-<arch>`.
- Target: the second half through a "new camera": each image rotated by a random angle
  in +-15 degrees and given Gaussian noise of sd 0.3 on the [-1, 1] scale. Per seed,
  K labelled images per class to train on, 10 per class for validation (choosing the
  epoch and the learning rate), the rest (~700) for test.

Methods, every one with the same --steps optimiser steps (AdamW, batch min(32, 10 K)),
the learning rate chosen from --lrs on validation: `scratch` (random weights, every layer
trains), and from the registered source through `registry://digits-source-<arch>@1`:
`feature_extract` (only the new head), `feature_extract_adapted_bn` (the same after the
frozen backbone's batch-norm statistics are re-estimated on the K labelled training
images, `model.adapt_batch_norm`; its seconds include that pass), `partial` (the last
stage and the head),
`finetune` (everything; the backbone at 0.1 x lr). They run rayline's own transfer code
(build_model, prepare_mode, parameter_groups, set_training) in this process, so the
figures are the methods', not Tune's overhead. Test accuracy is the best validation
epoch's (validation every steps/15 steps); seconds are training seconds.

Then rayline's transfer pipeline sweeps {scratch, feature_extract, partial, finetune} x
lr on the K=5 target of seed 0 with Tune (model.weights x model.mode x optim.lr; the
random-weight feature extractor and partial are in the grid too), picks by validation
accuracy and registers the winner; that registered model is loaded back and scored on
the test images, and must match its trial's own best checkpoint exactly.

Targets (test accuracy, means over seeds): finetune >= scratch + 0.30 at K=1 and +0.15 at
K=5; feature_extract within 0.03 of finetune in <= 0.5x its seconds; the sweep picks a
transfer strategy; the reload matches.
Last stdout line: {"archs": {"<arch>": {"k": {"1": {"scratch", "feature_extract",
"feature_extract_adapted_bn", "partial", "finetune", "seconds": {...}, "lr": {...}},
"5": {...}}, "source_valid_accuracy", "sweep_best_strategy", "sweep_test_accuracy", "reload_matches", "targets": {...}}},
"k": <first arch's "k">, "sweep_best_strategy", "reload_matches"}
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch

from common import emit, log

METHODS = ("scratch", "feature_extract", "feature_extract_adapted_bn", "partial", "finetune")
SIZE = 32
VALID_PER_CLASS = 10


def digit_images() -> tuple[list, np.ndarray, list, np.ndarray]:
    """(source images, labels, shifted target images, labels): 32x32 greyscale PIL
    images, the two halves of the digits by a seeded permutation."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    half = len(order) // 2
    rng = np.random.default_rng(1)

    def picture(pixels: np.ndarray) -> Image.Image:
        small = Image.fromarray((pixels * 255 / 16).astype(np.uint8))
        return small.resize((SIZE, SIZE), Image.Resampling.BILINEAR)

    def new_camera(image: Image.Image) -> Image.Image:
        turned = image.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR, fillcolor=0)
        noisy = np.asarray(turned, dtype=np.float64) + rng.normal(0, 0.3 * 127.5, (SIZE, SIZE))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    source = [picture(digits.images[i]) for i in order[:half]]
    target = [new_camera(picture(digits.images[i])) for i in order[half:]]
    return source, digits.target[order[:half]], target, digits.target[order[half:]]


def write_folder(root: str, parts: dict[str, tuple[list, np.ndarray]]) -> str:
    """root/<part>/<class>/<n>.png for each part (train, val, ...)."""
    for part, (images, labels) in parts.items():
        for n, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, part, str(int(label)))
            os.makedirs(folder, exist_ok=True)
            image.convert("RGB").save(os.path.join(folder, f"{n:04d}.png"))
    return root


def target_split(labels: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """Per class: k train, VALID_PER_CLASS validation, the rest test (indices)."""
    rng = np.random.default_rng(100 + seed)
    parts = {"train": [], "val": [], "test": []}
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        parts["train"] += members[:k].tolist()
        parts["val"] += members[k : k + VALID_PER_CLASS].tolist()
        parts["test"] += members[k + VALID_PER_CLASS :].tolist()
    return {name: np.array(sorted(rows)) for name, rows in parts.items()}


def tensors(images: list) -> torch.Tensor:
    """What the pipeline's evaluation transform makes of them (32x32, ImageNet-normalised)."""
    from rayline.vision.presets import eval_transform

    transform = eval_transform(SIZE, SIZE)
    return torch.stack([transform(image.convert("RGB")) for image in images])


def base_config(arch: str, path: str, store: str, results: str, name: str) -> dict:
    return {
        "data": {"path": path, "crop_size": SIZE, "resize_size": SIZE, "horizontal_flip": False},
        "model": {"arch": arch},
        "optim": {"optimizer": "adamw"},
        "schedule": {"kind": "cosine"},
        "run": {"name": name, "storage_path": results, "store_uri": store},
    }


def pretrain(arch: str, source, source_labels, work: str, store: str, epochs: int) -> float:
    """The source model, trained and registered by rayline's transfer pipeline."""
    from rayline import pipelines
    from rayline.config import from_dict
    from rayline.vision.classification import TransferConfig

    cut = int(0.8 * len(source))
    path = write_folder(
        os.path.join(work, f"source-{arch}"),
        {"train": (source[:cut], source_labels[:cut]), "val": (source[cut:], source_labels[cut:])},
    )
    config = base_config(arch, path, store, os.path.join(work, "results"), f"digits-source-{arch}")
    config["model"].update(weights="none", mode="finetune")
    config["optim"].update(lr=0.003, backbone_lr_scale=1.0)
    config["train"] = {"epochs": epochs, "batch_size": 32, "threads": 2}
    outcome = pipelines.run(
        pipelines.get_pipeline("transfer"), from_dict(TransferConfig, config), sweep=False
    )
    return float(outcome.best.metrics["best_valid_accuracy"])


def train_method(arch, method, lr, seed, data, store, steps) -> dict:
    """One method at one learning rate: test accuracy at the best validation epoch."""
    from rayline.vision import transfer

    torch.manual_seed(seed)
    weights = "none" if method == "scratch" else f"registry://digits-source-{arch}@1"
    mode = {"scratch": "finetune", "feature_extract_adapted_bn": "feature_extract"}.get(
        method, method
    )
    model, head = transfer.build_model(arch, 10, weights, store)
    transfer.prepare_mode(model, head, mode, 1)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data
    started = time.perf_counter()
    if method == "feature_extract_adapted_bn":  # model.adapt_batch_norm: true
        transfer.adapt_batch_norm(model, [(x_train, None)], torch.device("cpu"))
    adapt_seconds = time.perf_counter() - started
    scale = 1.0 if method == "scratch" else 0.1
    optimizer = torch.optim.AdamW(
        transfer.parameter_groups(model, head, mode, lr, scale), lr=lr, weight_decay=1e-4
    )
    batch = min(32, len(x_train))
    draw = torch.Generator().manual_seed(seed)
    criterion = torch.nn.CrossEntropyLoss()
    every = max(1, steps // 15)
    best, best_state, seconds = -1.0, None, adapt_seconds

    def accuracy(x, y) -> float:
        model.eval()
        with torch.inference_mode():
            return float((model(x).argmax(1) == y).float().mean())

    for step in range(steps):
        started = time.perf_counter()
        transfer.set_training(model, head, mode, 1)
        rows = torch.randperm(len(x_train), generator=draw)[:batch]
        loss = criterion(model(x_train[rows]), y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        if (step + 1) % every == 0 or step + 1 == steps:
            valid = accuracy(x_val, y_val)
            if valid > best:
                best, best_state = valid, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"valid": best, "test": accuracy(x_test, y_test), "seconds": seconds}


def compare(arch, k, seeds, target, target_labels, store, args) -> dict:
    """Every method, the learning rate chosen on validation, means over seeds."""
    images = tensors(target)
    labels = torch.from_numpy(target_labels).long()
    chosen = {m: [] for m in METHODS}
    for seed in range(seeds):
        split = target_split(target_labels, k, seed)
        data = [(images[split[p]], labels[split[p]]) for p in ("train", "val", "test")]
        for method in METHODS:
            runs = [
                (lr, train_method(arch, method, lr, seed, data, store, args.steps))
                for lr in args.lrs
            ]
            lr, best = max(runs, key=lambda run: run[1]["valid"])
            chosen[method].append({**best, "lr": lr})
            log(
                f"  {arch} K={k} seed {seed} {method}: lr {lr} valid {best['valid']:.3f} "
                f"test {best['test']:.3f} ({best['seconds']:.1f} s)"
            )
    return {
        **{m: round(float(np.mean([r["test"] for r in chosen[m]])), 4) for m in METHODS},
        "seconds": {
            m: round(float(np.mean([r["seconds"] for r in chosen[m]])), 2) for m in METHODS
        },
        "lr": {m: [r["lr"] for r in chosen[m]] for m in METHODS},
        "test_by_seed": {m: [round(r["test"], 4) for r in chosen[m]] for m in METHODS},
    }


def sweep_and_reload(arch, target, target_labels, work, store, args) -> dict:
    """rayline's Tune sweep over strategy x lr on K=5 (seed 0); the registered winner,
    loaded back, scored on test against its trial's own checkpoint."""
    from rayline import pipelines
    from rayline.config import from_dict
    from rayline.store import ModelRegistry
    from rayline.vision.classification import TransferConfig
    from rayline.vision.predictors import load_classifier
    from rayline.vision.training import read_checkpoint

    split = target_split(target_labels, 5, 0)
    pick = lambda rows: ([target[i] for i in rows], target_labels[rows])  # noqa: E731
    path = write_folder(
        os.path.join(work, f"target-{arch}"), {p: pick(split[p]) for p in ("train", "val")}
    )
    name = f"digits-target-{arch}"
    config = base_config(arch, path, store, os.path.join(work, "results"), name)
    config["model"]["weights"] = "none"  # the grid below sets it per trial
    config["optim"]["backbone_lr_scale"] = 0.1
    config["train"] = {"epochs": max(1, args.steps // 2), "batch_size": 32}  # 50 images: 2 batches
    config["sweep"] = {
        "num_samples": 1,
        "params": {
            "model.weights": {"grid": ["none", f"registry://digits-source-{arch}@1"]},
            "model.mode": {"grid": ["finetune", "feature_extract", "partial"]},
            "optim.lr": {"grid": list(args.lrs)},
        },
    }
    outcome = pipelines.run(
        pipelines.get_pipeline("transfer"), from_dict(TransferConfig, config), sweep=True
    )
    best = outcome.best.config["model"]
    strategy = "scratch" if best["weights"] == "none" else best["mode"]
    if best["weights"] == "none" and best["mode"] != "finetune":
        strategy = f"random_{best['mode']}"
    x_test = tensors([target[i] for i in split["test"]])
    y_test = torch.from_numpy(target_labels[split["test"]]).long()

    def test_accuracy(files) -> float:
        model, _ = load_classifier(files)
        with torch.inference_mode():
            return float((model(x_test).argmax(1) == y_test).float().mean())

    with outcome.best.checkpoint.as_directory() as directory:
        trial = test_accuracy(read_checkpoint(directory))
    registry = ModelRegistry(store)
    registered = test_accuracy(registry.read_files(registry.get(name, "latest")))
    log(f"  {arch} sweep: best {strategy} lr {outcome.best.config['optim']['lr']}, test {trial}")
    return {
        "sweep_best_strategy": strategy,
        "sweep_best_lr": outcome.best.config["optim"]["lr"],
        "sweep_test_accuracy": round(trial, 4),
        "reload_matches": registered == trial,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs", type=lambda t: t.split(","), default=["resnet18", "shufflenet_v2_x0_5"]
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--source-epochs", type=int, default=40)
    parser.add_argument("--ks", type=lambda t: [int(k) for k in t.split(",")], default=[1, 5])
    parser.add_argument(
        "--lrs",
        type=lambda t: [float(v) for v in t.split(",")],
        default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    )
    parser.add_argument("--no-sweep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from rayline.testing import init_local_ray

    torch.set_num_threads(2)
    source, source_labels, target, target_labels = digit_images()
    init_local_ray()
    out: dict = {"archs": {}}
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as work:
        store = os.path.join(work, "store")
        for arch in args.archs:
            log(f"{arch}: pretraining on the source half ...")
            result: dict = {
                "source_valid_accuracy": pretrain(
                    arch, source, source_labels, work, store, args.source_epochs
                )
            }
            log(f"  source valid accuracy {result['source_valid_accuracy']:.3f}")
            torch.set_num_threads(2)  # the pipeline's trial may have set its own
            result["k"] = {
                str(k): compare(arch, k, args.seeds, target, target_labels, store, args)
                for k in args.ks
            }
            if not args.no_sweep:
                result.update(sweep_and_reload(arch, target, target_labels, work, store, args))
            targets = {}
            for k, bar in (("1", 0.30), ("5", 0.15)):
                if k in result["k"]:
                    gain = result["k"][k]["finetune"] - result["k"][k]["scratch"]
                    targets[f"finetune_minus_scratch_k{k}"] = round(gain, 4)
                    targets[f"finetune_beats_scratch_by_{bar}_k{k}"] = gain >= bar
                    fe = result["k"][k]
                    for method in ("feature_extract", "feature_extract_adapted_bn"):
                        targets[f"{method}_gap_k{k}"] = round(fe["finetune"] - fe[method], 4)
                        targets[f"{method}_seconds_ratio_k{k}"] = round(
                            fe["seconds"][method] / fe["seconds"]["finetune"], 3
                        )
            result["targets"] = targets
            out["archs"][arch] = result
    first = out["archs"][args.archs[0]]
    out.update(
        k=first["k"],
        sweep_best_strategy=first.get("sweep_best_strategy"),
        reload_matches=first.get("reload_matches"),
    )
    emit(out)


if __name__ == "__main__":
    main()
