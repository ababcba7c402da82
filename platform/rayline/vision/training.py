"""The epoch loop every vision pipeline shares, as the body of its Tune trainable: train
an epoch, evaluate, step the schedule, keep the best epoch's weights, report.

Every report that improves the best score, every `checkpoint_every`-th and the last one
carries a checkpoint: the best weights (best.pt), the model's description (model.json)
and what resuming needs (state.pt: the current weights unless they are best.pt's,
optimiser, schedule, RNG states and counters). A trial that resumes from it ends
bit-for-bit where it would have without the interruption, and the latest checkpoint
always holds the weights behind the best score reported so far: what gets registered.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rayline.config import ConfigError, DataError, bounded, to_dict
from rayline.drift import PROFILE_FILE
from rayline.family import Pipeline, model_metrics, trial_record
from rayline.fs import atomic_write
from rayline.store import ModelRegistry, ModelVersion

BEST_FILE = "best.pt"
META_FILE = "model.json"
STATE_FILE = "state.pt"


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
    """L2 penalty on the trained weights (decoupled from the gradient for adamw)."""
    label_smoothing: float = bounded(0.0, ge=0.0, lt=1.0)
    """Share of each target's probability spread evenly over the other classes."""


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
    """Images per training and validation batch."""
    threads: int = bounded(1, ge=1)
    """torch threads per trial; the trial reserves as many CPUs."""
    gpus: float = bounded(0.0, ge=0.0)
    """GPUs per trial; the trial trains on `cuda` whenever it sees one."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """`bfloat16`: training steps under autocast (faster on GPUs since Ampere and on CPUs
    with AVX512-BF16 or AMX; `benchmarks/vision.py` measures it). Validation, the saved
    and registered model and serving stay float32: what is registered is what was scored."""
    channels_last: bool = False
    """Train in the channels-last (NHWC) layout, faster for cuDNN's and oneDNN's
    convolutions; validation runs in the default layout, as serving does."""
    checkpoint_every: int = bounded(1, ge=1)
    """Epochs between checkpoints (each holds the weights twice and the optimiser state);
    an epoch that improves the best score and the last epoch are always checkpointed."""


def make_optimizer(o: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: Literal["constant", "step", "cosine"],
    epochs: int,
    warmup_epochs: int = 0,
    step_size: int = 10,
    gamma: float = 0.1,
    warmup_factor: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule, as in torchvision's reference: a linear warm-up from
    `warmup_factor` x lr over `warmup_epochs`, then constant, step decay (x gamma every
    `step_size` epochs) or cosine annealing to 0 over the remaining epochs."""
    from torch.optim import lr_scheduler

    remaining = max(epochs - warmup_epochs, 1)
    if kind == "constant":
        main = lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    elif kind == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif kind == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=remaining)
    else:
        raise ConfigError(f"schedule.kind: expected constant, step or cosine, got {kind!r}")
    if not warmup_epochs:
        return main
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return make_scheduler(optimizer, cfg.kind, epochs, cfg.warmup_epochs, cfg.step_size, cfg.gamma)


def trial_resources(train: EpochsConfig) -> dict:
    resources = {"cpu": train.threads}
    if train.gpus:
        resources["gpu"] = train.gpus
    return resources


@dataclasses.dataclass
class Training:
    """What one trial trains, and how an epoch of it goes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator
    """Draws the training batches' order (the DataLoader's generator)."""
    train_epoch: Callable[[], dict[str, float]]
    """One pass over the training data: {"loss": ..., other figures}."""
    evaluate: Callable[[], dict[str, float]]
    """The model on the validation data: {"loss": ..., the score, other figures}."""


def start_trial(train: EpochsConfig, seed: int) -> torch.device:
    """A trial's torch: its threads, its seed, and `cuda` when it sees a GPU (Ray hides
    the GPUs from a trial that reserved none)."""
    torch.set_num_threads(train.threads)
    torch.manual_seed(seed)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_epochs(training: Training, train: EpochsConfig, *, score: str, meta: dict) -> None:
    """Train for `train.epochs` (or what is left of them after the trial's last checkpoint),
    ranking epochs by the validation `score` (higher is better; ties go to the lower
    loss) and reporting `best_valid_<score>` for trials to be compared by."""
    from ray import tune

    t = training
    best = {score: -1.0, "loss": float("inf"), "epoch": 0}
    best_weights: dict | None = None
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory, STATE_FILE), map_location="cpu", weights_only=True)
            best_weights = torch.load(Path(directory, BEST_FILE), weights_only=True)
        t.model.load_state_dict(best_weights if state["model"] is None else state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        # The shuffles and augmentations go on as if the trial had never stopped.
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        t.shuffle.set_state(state["shuffle_rng"])
        start, best = state["epoch"], state["best"]
    epochs = train.epochs
    for epoch in range(start, epochs):
        lr = t.optimizer.param_groups[0]["lr"]
        trained = t.train_epoch()
        scored = t.evaluate()
        t.scheduler.step()
        improved = scored[score] > best[score] or (
            scored[score] == best[score] and scored["loss"] < best["loss"]
        )
        if improved:
            best = {score: scored[score], "loss": scored["loss"], "epoch": epoch + 1}
            best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in t.model.state_dict().items()
            }
        metrics = {
            "epoch": epoch + 1,
            "timesteps_total": epoch + 1,  # Tune's step: TensorBoard's x-axis is epochs
            "lr": lr,
            **{f"train_{k}": v for k, v in trained.items()},
            **{f"valid_{k}": v for k, v in scored.items()},
            f"best_valid_{score}": best[score],
            "best_valid_loss": best["loss"],
            "best_epoch": best["epoch"],
        }
        last = epoch + 1 == epochs
        if not (improved or last or (epoch + 1) % train.checkpoint_every == 0):
            tune.report(metrics)
            continue
        state = {
            # After an improving epoch the current weights are best.pt: not saved twice.
            "model": None if improved else t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # Dropout and any augmentation run on the GPU draw from its own generators.
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # The DataLoader's order, and its workers' seeds, come from this generator.
            "shuffle_rng": t.shuffle.get_state(),
            "epoch": epoch + 1,
            "best": best,
        }
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, Path(directory, STATE_FILE))
            torch.save(best_weights, Path(directory, BEST_FILE))
            Path(directory, META_FILE).write_text(json.dumps({**meta, "best": best}, indent=1))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def read_checkpoint(directory: str) -> dict[str, bytes]:
    """The files a registered model keeps: the best weights and their description."""
    return {name: Path(directory, name).read_bytes() for name in (BEST_FILE, META_FILE)}


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What a vision task computes about its models and data, for `vision_pipeline`."""

    score_files: Callable
    """(files, cfg, valid) -> {score: value}: a saved model scored on the validation set."""
    pictures: Callable
    """(files, cfg, valid, history) -> {file name: PNG bytes}, registered with the model."""
    profile: Callable
    """train -> the drift reference profile (rayline.drift)."""
    data_fingerprint: Callable
    """(train, valid) -> the data's fingerprint."""
    read_data: Callable | None = None
    """cfg -> (train, valid) again, from a registered version's config (for compare)."""
    per_image: Callable | None = None
    """(files, cfg, valid) -> one score per validation image (for compare)."""


def vision_pipeline(
    name: str,
    config_cls: type,
    trainable,
    kind: str,
    score: str,
    *,
    prepare,
    scoring: Scoring,
    serves: dict,
) -> Pipeline:
    """A vision pipeline: trials run this epoch loop and are ranked by
    `best_valid_<score>`; the best one's best epoch is registered as `kind` after it is
    re-scored on the validation images, for the stored model must score what its trial
    reported (ray-project/ray#20267), with the drift reference `scoring.profile(train)`
    of its training images (rayline.drift). Its pictures (`scoring.pictures`) are written
    to the trial's directory, beside its checkpoints, and registered with the model.

    Two versions compare (`rayline models compare`) on the challenger's validation
    images: `scoring.read_data(cfg)` lists (train, valid) again from its recorded config,
    checked against its recorded fingerprint, and `scoring.per_image` scores each image;
    the scores are paired over images."""
    score_files, pictures, profile = scoring.score_files, scoring.pictures, scoring.profile
    data_fingerprint, read_data, per_image = (
        scoring.data_fingerprint,
        scoring.read_data,
        scoring.per_image,
    )

    def register(cfg, result, registry: ModelRegistry, inputs: dict) -> ModelVersion:
        if result.checkpoint is None:
            raise RuntimeError("the best trial left no checkpoint")
        with result.checkpoint.as_directory() as directory:
            files = read_checkpoint(directory)
        metrics = model_metrics(result)
        scored = score_files(files, cfg, inputs["valid"])
        if scored[score] != metrics.get(f"best_valid_{score}"):
            raise RuntimeError(
                f"the best trial's saved model scores valid {score} {scored[score]} "
                f"but its trial reported {metrics.get(f'best_valid_{score}')}"
            )
        files[PROFILE_FILE] = json.dumps(profile(inputs["train"])).encode()
        drawn = pictures(files, cfg, inputs["valid"], epoch_history(result))
        for file_name, data in drawn.items():
            atomic_write(
                result.filesystem,
                f"{result.path}/{file_name}",
                lambda out, data=data: out.write(data),
            )
        return registry.register(
            cfg.run.name,
            {**files, **drawn},
            kind=kind,
            metrics=metrics,
            config=to_dict(cfg),
            data_fingerprint=data_fingerprint(inputs["train"], inputs["valid"]),
            run=trial_record(result),
        )

    def compare(registry: ModelRegistry, a: ModelVersion, b: ModelVersion, samples: int):
        from rayline.compare import paired
        from rayline.config import from_dict

        cfg = from_dict(config_cls, b.config)
        where = f"{a.name} v{b.version}'s validation images"
        try:
            train, valid = read_data(cfg)
        except (ConfigError, DataError, OSError) as exc:
            raise ConfigError(f"{where} are gone: {exc}") from None
        if data_fingerprint(train, valid) != b.data_fingerprint:
            raise ConfigError(f"{where} ({cfg.data.path}) have changed since registration")
        files = [registry.read_files(mv) for mv in (a, b)]
        classes = [json.loads(f[META_FILE])["classes"] for f in files]
        if classes[0] != classes[1]:
            raise ConfigError(
                f"{a.name} v{a.version} and v{b.version} cannot be compared: "
                f"classes {classes[0]} vs {classes[1]}"
            )
        scores = [per_image(f, cfg, valid) for f in files]
        return paired(f"valid_image_{score}", True, (a.version, scores[0]), (b.version, scores[1]))

    return Pipeline(
        name,
        config_cls,
        trainable,
        lambda cfg: trial_resources(cfg.train),
        f"best_valid_{score}",
        "max",
        register,
        prepare=prepare,
        time_attr="epoch",
        max_budget=lambda cfg: cfg.train.epochs,
        serves=serves,
        progress=lambda result: epoch_line(result, score),
        compare=compare if read_data and per_image else None,
    )


def epoch_history(result) -> list[dict]:
    """The trial's reports, one per epoch in order (a resumed trial's repeated epochs
    once, the latest report)."""
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame:
        return []
    by_epoch = {int(row["epoch"]): row for row in frame.to_dict("records")}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def epoch_line(result: dict, score: str) -> str | None:
    """One line per epoch: train loss, the validation score and loss, the learning rate
    the epoch ran at, its seconds and its training images/s."""
    if "epoch" not in result:
        return None
    return (
        f"epoch {result['epoch']}: train_loss={result.get('train_loss', float('nan')):.4f} "
        f"valid_{score}={result.get(f'valid_{score}', float('nan')):.4f} "
        f"valid_loss={result.get('valid_loss', float('nan')):.4f} "
        f"lr={result.get('lr', float('nan')):.3g} {result.get('time_this_iter_s', 0.0):.1f}s "
        f"({result.get('train_images_per_s', float('nan')):.0f} train images/s)"
    )
