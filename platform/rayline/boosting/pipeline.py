"""The XGBoost pipeline: data preparation in the driver, the Tune trainable and what
registering the best trial needs. Each trial reports its validation metrics as it goes
(rayline.boosting.report), so ASHA can stop the ones that trail, and ends with one
report that carries the final model as a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rayline.boosting.config import XGBoostConfig, max_rounds
from rayline.boosting.data import (
    Table,
    Task,
    infer_task,
    read_label,
    read_table,
    split,
    to_table,
)
from rayline.boosting.distributed import TRIAL_CPUS, check_cluster, train_data_parallel
from rayline.boosting.model import META_FILE, BoostedModel
from rayline.boosting.report import TuneReport, final_metrics, report_final, report_rounds, restore
from rayline.boosting.served import SERVED
from rayline.boosting.train import BestRound, booster_params, fit
from rayline.config import ConfigError, DataError, from_dict, to_dict
from rayline.drift import PROFILE_FILE
from rayline.family import Pipeline, model_metrics, trial_record
from rayline.fs import fingerprint
from rayline.store import ModelRegistry, ModelVersion


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
        train_data_parallel(cfg, task)
        return
    params = booster_params(cfg.params, task, threads=cfg.train.threads, seed=cfg.run.seed)
    dtrain, dvalid = train.dmatrix(cfg.train.threads), valid.dmatrix(cfg.train.threads)
    tracker, start_from = BestRound(task, cfg.train.early_stopping_rounds), None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_from, tracker = restore(directory, task, cfg.train.early_stopping_rounds)
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


def table_fingerprint(*tables: Table) -> str:
    parts: list[bytes | str] = []
    for table in tables:
        parts += [
            np.ascontiguousarray(table.features).tobytes(),
            np.ascontiguousarray(table.label).tobytes(),
            json.dumps([table.feature_names, table.feature_types, table.categories]),
        ]
    return fingerprint(*parts)


def register(cfg: XGBoostConfig, result, registry: ModelRegistry, inputs: dict) -> ModelVersion:
    """The best trial's final checkpoint, after checking that the model as stored scores
    what its trial reported (ray-project/ray#20267)."""
    if result.checkpoint is None:
        raise RuntimeError("the best trial left no checkpoint")
    with result.checkpoint.as_directory() as directory:
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
    metrics = model_metrics(result)
    if "valid" in inputs:
        scored = final_metrics(BoostedModel.from_files(files), inputs["valid"])
        if scored["valid_loss"] != metrics.get("valid_loss"):
            raise RuntimeError(
                f"the best trial's model scores valid_loss={scored['valid_loss']} "
                f"but its trial reported {metrics.get('valid_loss')}"
            )
    if "train" in inputs:  # what drift is measured against where the model is served
        profile = BoostedModel.from_files(files).profile(inputs["train"].features)
        files[PROFILE_FILE] = json.dumps(profile).encode()
    return registry.register(
        cfg.run.name,
        files,
        kind="xgboost",
        metrics=metrics,
        config=to_dict(cfg),
        data_fingerprint=json.loads(files[META_FILE]).get("data_fingerprint", ""),
        run=trial_record(result),
    )


def compare(registry: ModelRegistry, a: ModelVersion, b: ModelVersion, rows: int):
    """Both models on the validation rows the challenger (b) was scored on, found from its
    recorded config and checked against its recorded data fingerprint; the paired
    differences of their per-row losses (log loss, or squared error for regression).
    `rows` is unused: every validation row is a sample."""
    from rayline.compare import paired

    cfg = from_dict(XGBoostConfig, b.config)
    where = f"{a.name} v{b.version}'s validation data"
    if cfg.distributed.workers:
        raise ConfigError(f"{where}: a data-parallel run's validation split cannot be rebuilt yet")
    try:
        data = load_data(cfg)
    except (ConfigError, DataError, OSError) as exc:
        raise ConfigError(f"{where} is gone: {exc}") from None
    if table_fingerprint(data["train"], data["valid"]) != b.data_fingerprint:
        raise ConfigError(f"{where} ({cfg.data.path}) has changed since it was registered")
    models = [BoostedModel.from_files(registry.read_files(mv)) for mv in (a, b)]
    valid = data["valid"]
    for what, x, y in (
        ("task", models[0].task.kind, models[1].task.kind),
        ("features", models[0].feature_names, models[1].feature_names),
        ("categories", models[0].categories, valid.categories),
    ):
        if x != y:
            raise ConfigError(
                f"{a.name} v{a.version} and v{b.version} cannot be compared: {what} {x} vs {y}"
            )
    losses = [row_losses(model, valid) for model in models]
    metric = "valid_squared_error" if models[1].task.kind == "regression" else "valid_logloss"
    return paired(metric, False, (a.version, losses[0]), (b.version, losses[1]))


def row_losses(model: BoostedModel, table: Table) -> np.ndarray:
    """Each row's loss: log loss of its label's probability, or squared error."""
    predicted = model.predict(table.features).astype(np.float64)
    label = table.label
    if model.task.kind == "regression":
        return (predicted - label) ** 2
    if model.task.kind == "binary":
        predicted = np.stack([1.0 - predicted, predicted], axis=1)
    chosen = predicted[np.arange(len(label)), label.astype(np.int64)]
    return -np.log(np.clip(chosen, 1e-15, 1.0))


def trial_resources(cfg: XGBoostConfig) -> dict:
    if cfg.distributed.workers:
        # Ray Train reserves its workers itself; the trial only waits on them.
        return {"cpu": TRIAL_CPUS}
    return {"cpu": cfg.train.threads}


PIPELINE = Pipeline(
    "xgboost",
    XGBoostConfig,
    boosting_trainable,
    trial_resources,
    "valid_loss",
    "min",
    register,
    prepare=prepare,
    time_attr="rounds",
    max_budget=max_rounds,
    check_cluster=check_cluster,
    serves=SERVED,
    compare=compare,
)
