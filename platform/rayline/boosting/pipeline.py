"""The XGBoost pipeline: config, data preparation in the driver, the Tune trainable and
what registering the best trial needs.

Each trial reports its validation metrics every `train.report_every` rounds, so ASHA can
stop the ones that trail, and ends with one report that carries the final model as a
checkpoint. That last checkpoint is written after boosting ends (ray-project/ray#40705:
a callback that checkpoints every N rounds misses the final model), and the score in
that report is computed from the saved model at its best round, so the registered model
reproduces it exactly (ray-project/ray#20267).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import xgboost as xgb

from rayline.boosting.data import (
    Table,
    Task,
    infer_task,
    read_label,
    read_table,
    split,
    to_table,
)
from rayline.boosting.model import MODEL_FILE, BoostedModel
from rayline.boosting.train import BestRound, RoundsConfig, TreeParams, booster_params, fit
from rayline.config import ConfigError, RunConfig, SweepConfig, bounded, from_dict, named
from rayline.fs import fingerprint

OBJECTIVES = ("auto", "binary:logistic", "multi:softprob", "reg:squarederror", "reg:absoluteerror")
STATE_FILE = "state.json"


@dataclasses.dataclass
class TableConfig:
    path: str = ""
    """Training data: a .parquet or .csv file (or Parquet directory), local or URI."""
    label: str = "target"
    """The column to predict."""
    features: list[str] = dataclasses.field(default_factory=list)
    """Feature columns; empty means every column but the label."""
    categorical: Literal["auto", "reject"] = "auto"
    """`auto`: text columns become XGBoost categorical features; `reject`: an error."""
    valid_path: str = ""
    """A separate validation file; empty means split `valid_fraction` off the data."""
    valid_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    """Share of rows held out for validation (early stopping, ASHA and selection)."""
    split_seed: int = 0
    """Seeds the train/validation split."""


@dataclasses.dataclass
class DistributedConfig:
    workers: int = bounded(0, ge=0)
    """Ray Train data-parallel workers, each boosting on its shard of the data read with
    Ray Data (0: one process boosts on data held in memory)."""
    cpus_per_worker: float = bounded(1.0, gt=0.0)
    """CPUs each worker reserves."""


@dataclasses.dataclass
class BoostingRunConfig(RunConfig):
    name: str = named("xgboost")


@dataclasses.dataclass
class XGBoostConfig:
    pipeline: Literal["xgboost"] = "xgboost"
    """Which pipeline this file configures."""
    data: TableConfig = dataclasses.field(default_factory=TableConfig)
    objective: Literal[OBJECTIVES] = "auto"
    """`auto` infers it from the label: integer 0/1 binary, 0..K-1 multiclass, float
    regression."""
    params: TreeParams = dataclasses.field(default_factory=TreeParams)
    train: RoundsConfig = dataclasses.field(default_factory=RoundsConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    run: BoostingRunConfig = dataclasses.field(default_factory=BoostingRunConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    """Search space over params.* and train.rounds; with ASHA, budgets count rounds."""


def prepare(cfg: XGBoostConfig) -> dict:
    """What trials need, checked in the driver before any of them starts: the split
    tables and the task, or for data-parallel runs (whose workers read their own shards)
    the task, from the label column alone."""
    if not cfg.distributed.workers:
        return load_data(cfg)
    if not cfg.data.path:
        raise ConfigError("data.path: expected the training data (a Parquet file or directory)")
    label = read_label(cfg.data.path, cfg.data.label, cfg.data.features or None)
    return {"task": infer_task(label, cfg.objective, source=cfg.data.path)}


def load_data(cfg: XGBoostConfig) -> dict:
    """Read, check and split the data once, in the driver: {"train", "valid", "task"}."""
    d = cfg.data
    if not d.path:
        raise ConfigError("data.path: expected the training data (a .parquet or .csv file)")
    options = {"label": d.label, "features": d.features or None, "categorical": d.categorical}
    data = to_table(read_table(d.path), source=d.path, **options)
    if d.valid_path:
        train = data
        valid = to_table(
            read_table(d.valid_path), source=d.valid_path, categories=train.categories, **options
        )
        if valid.feature_names != train.feature_names:
            raise ConfigError(f"{d.valid_path}: its feature columns differ from {d.path}'s")
    else:
        train, valid = split(data, d.valid_fraction, d.split_seed)
    task = infer_task(train.label, cfg.objective, source=d.path)
    if task.kind != "regression" and valid.label.max(initial=0) >= max(task.num_class, 2):
        raise ConfigError(
            f"{d.valid_path or d.path}: validation labels outside the training classes"
        )
    return {"train": train, "valid": valid, "task": task}


def boosting_trainable(
    config: dict, train: Table | None = None, valid: Table | None = None, task: Task | None = None
) -> None:
    """Tune function trainable: boost one configuration, report as it goes, and end with
    the model as a checkpoint. Resumes from a mid-trial checkpoint when there is one."""
    from ray import tune

    cfg = from_dict(XGBoostConfig, config)
    if cfg.distributed.workers:
        from rayline.boosting.distributed import train_data_parallel

        train_data_parallel(cfg, task)
        return
    params = booster_params(cfg.params, task, threads=cfg.train.threads, seed=cfg.run.seed)
    dtrain, dvalid = train.dmatrix(cfg.train.threads), valid.dmatrix(cfg.train.threads)
    tracker, start_from = BestRound(task, cfg.train.early_stopping_rounds), None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_from, tracker = _restore(directory, task, cfg.train.early_stopping_rounds)
    model = fit(
        params,
        task,
        dtrain,
        dvalid,
        rounds=cfg.train.rounds,
        tracker=tracker,
        callbacks=[
            TuneReport(tracker, report_rounds(cfg), cfg.train.checkpoint_every, cfg.train.rounds)
        ],
        start_from=start_from,
        categories=train.categories,
    )
    report_final(model, valid, {"data_fingerprint": table_fingerprint(train, valid)})


def report_final(model: BoostedModel, valid: Table, extra: dict) -> None:
    """The trial's last report, with the model as its checkpoint: model.ubj, model.json
    (with the metrics and each feature's gain) and importance.png."""
    from ray import tune

    metrics = final_metrics(model, valid)
    files = model.files({"metrics": metrics, **extra})
    with tempfile.TemporaryDirectory() as directory:
        for name, blob in files.items():
            Path(directory, name).write_bytes(blob)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def final_metrics(model: BoostedModel, valid: Table) -> dict[str, float]:
    """What a trial ends with and its registered model must reproduce: the metrics of the
    saved model at its best round, `valid_loss` being the one trials are ranked by."""
    scores = model.score(valid)
    return {
        **{f"valid_{name}": value for name, value in scores.items()},
        "valid_loss": scores[model.task.eval_metrics[0]],
        "best_iteration": model.best_iteration,
        "rounds": model.rounds,
    }


def report_rounds(cfg: XGBoostConfig) -> set[int] | int:
    """When a trial reports: every `train.report_every` rounds, or by default at the
    rounds where ASHA compares trials (its rungs: grace_period * reduction_factor**k)."""
    if cfg.train.report_every:
        return cfg.train.report_every
    sweep = cfg.sweep
    max_t = sweep.max_t or max_rounds(cfg)
    rungs = int(math.log(max_t / sweep.grace_period) / math.log(sweep.reduction_factor) + 1)
    return {math.ceil(sweep.grace_period * sweep.reduction_factor**k) for k in range(max(rungs, 0))}


def report_due(when: set[int] | int, done: int, last_round: int) -> bool:
    """Whether a trial reports after `done` rounds (see `report_rounds`). Never at the last
    round: the final report, with the model, follows, and a report here could make ASHA
    stop the trial at max_t before that checkpoint is taken."""
    if done == last_round:
        return False
    return done in when if isinstance(when, set) else done % when == 0


class TuneReport(xgb.callback.TrainingCallback):
    """Reports the tracker's progress at the rounds `when` names (a set, or every that many
    rounds), with a checkpoint every `checkpoint_every` rounds."""

    def __init__(
        self, tracker: BestRound, when: set[int] | int, checkpoint_every: int, last_round: int
    ):
        self.tracker = tracker
        self.when = when
        self.checkpoint_every = checkpoint_every
        self.last_round = last_round

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        from ray import tune

        done = epoch + 1
        due = report_due(self.when, done, self.last_round)
        checkpoint_due = (
            bool(self.checkpoint_every)
            and done % self.checkpoint_every == 0
            and done != self.last_round
        )
        if not (due or checkpoint_due):
            return False
        metrics = self.tracker.progress(done)
        if not checkpoint_due:
            tune.report(metrics)
            return False
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, MODEL_FILE).write_bytes(bytes(model.save_raw(raw_format="ubj")))
            state = {
                "best_score": self.tracker.best_score,
                "best_iteration": self.tracker.best_iteration,
            }
            Path(directory, STATE_FILE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        return False


def _restore(directory: str, task: Task, patience: int):
    booster = xgb.Booster(model_file=os.path.join(directory, MODEL_FILE))
    state = json.loads(Path(directory, STATE_FILE).read_text())
    return booster, BestRound(task, patience, state["best_score"], state["best_iteration"])


def table_fingerprint(*tables: Table) -> str:
    parts: list[bytes | str] = []
    for table in tables:
        parts += [
            np.ascontiguousarray(table.features).tobytes(),
            np.ascontiguousarray(table.label).tobytes(),
            json.dumps([table.feature_names, table.feature_types, table.categories]),
        ]
    return fingerprint(*parts)


def max_rounds(cfg: XGBoostConfig) -> int:
    """The largest budget a trial of this sweep can ask for (ASHA's max_t)."""
    spec = cfg.sweep.params.get("train.rounds")
    if not spec:
        return cfg.train.rounds
    ((kind, values),) = spec.items()
    return int(max(values)) if kind != "randint" else int(values[1]) - 1
