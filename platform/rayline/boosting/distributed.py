"""Data-parallel boosting for data larger than one node: Ray Data reads the Parquet
files and shards them over Ray Train's XGBoost workers, which build one model together
(XGBoost's collective allreduces the gradient histograms and evaluation metrics).

One Tune trial runs one Ray Train run. Train's reports reach Tune through
`TuneReportCallback`, so ASHA sees the rounds; when the run ends, the trial scores the
final model on the whole validation set and reports it with the model as a checkpoint.
Features must be numeric here: category codes learned per shard would disagree.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa

from rayline.boosting.config import XGBoostConfig
from rayline.boosting.data import Table, Task, to_table
from rayline.boosting.model import BoostedModel
from rayline.boosting.report import report_due, report_final, report_rounds
from rayline.boosting.train import BestRound, booster_params, fit
from rayline.config import ConfigError, from_dict, to_dict
from rayline.fs import file_digests, filesystem, fingerprint

TRIAL_CPUS = 0.01
"""What the Tune trial that drives a Ray Train run reserves: it only waits."""


def _shard_table(name: str, cfg, source: str) -> Table:
    import ray.train

    shard = ray.train.get_dataset_shard(name).materialize()
    return _to_table(shard, cfg, source)


def _to_table(dataset, cfg, source: str) -> Table:
    import ray

    arrow = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    return to_table(
        arrow,
        label=cfg.data.label,
        features=cfg.data.features or None,
        categorical="reject",
        source=source,
    )


def _per_worker(config: dict) -> None:
    import ray.train
    import xgboost as xgb

    cfg = from_dict(XGBoostConfig, config["cfg"])
    when = report_rounds(cfg)
    task = Task(**config["task"])
    train = _shard_table("train", cfg, cfg.data.path)
    valid = _shard_table("valid", cfg, cfg.data.valid_path or cfg.data.path)
    threads = max(1, int(cfg.distributed.cpus_per_worker))
    params = booster_params(cfg.params, task, threads=threads, seed=cfg.run.seed)
    tracker = BestRound(task, cfg.train.early_stopping_rounds)

    # XGBoost's collective has already averaged the metrics over the workers' shards.
    class TrainReport(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch: int, evals_log) -> bool:
            if report_due(when, epoch + 1, cfg.train.rounds):
                ray.train.report(tracker.progress(epoch + 1))
            return False

    model = fit(
        params,
        task,
        train.dmatrix(threads),
        valid.dmatrix(threads),
        rounds=cfg.train.rounds,
        tracker=tracker,
        callbacks=[TrainReport()],
    )
    # Every worker holds the same model; rank 0 saves it.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            for name, blob in model.files().items():
                Path(directory, name).write_bytes(blob)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(tracker.progress(model.rounds), checkpoint=checkpoint)


def datasets(cfg):
    """The train and validation Ray Datasets: the validation file, or a seeded split."""
    import ray.data

    train = ray.data.read_parquet(cfg.data.path)
    if cfg.data.valid_path:
        return train, ray.data.read_parquet(cfg.data.valid_path)
    return train.train_test_split(cfg.data.valid_fraction, shuffle=True, seed=cfg.data.split_seed)


def check_cluster(cfg) -> None:
    """Refuse, before any trial starts, a data-parallel run this cluster cannot hold:
    Ray Data's read tasks need a whole CPU beside the workers, or the run waits forever."""
    import ray

    if not cfg.distributed.workers:
        return
    workers_cpus = cfg.distributed.workers * cfg.distributed.cpus_per_worker
    spare = ray.cluster_resources().get("CPU", 0) - workers_cpus - TRIAL_CPUS
    if spare < 1:
        raise ConfigError(
            f"distributed: {cfg.distributed.workers} workers x {cfg.distributed.cpus_per_worker} "
            f"CPU leave {spare:.2f} CPUs of this cluster for reading the data (needs 1); "
            "lower distributed.workers or distributed.cpus_per_worker"
        )


def train_data_parallel(cfg, task: Task) -> None:
    """Run inside a Tune trial: one Ray Train XGBoost run over `cfg.distributed.workers`."""
    import ray
    import ray.train
    from ray.train.xgboost import XGBoostTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    train, valid = datasets(cfg)
    result = XGBoostTrainer(
        _per_worker,
        train_loop_config={"cfg": to_dict(cfg), "task": dataclasses.asdict(task)},
        datasets={"train": train, "valid": valid},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.distributed.workers,
            resources_per_worker={"CPU": cfg.distributed.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            # Unique per run: a reused trial actor's context can name the previous trial.
            name=f"{cfg.run.name}-train-{uuid.uuid4().hex[:8]}",
            callbacks=[TuneReportCallback()],
        ),
    ).fit()
    with result.checkpoint.as_directory() as directory:
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
    model = BoostedModel.from_files(files)
    valid_table = _to_table(valid, cfg, cfg.data.valid_path or cfg.data.path)
    report_final(model, valid_table, {"data_fingerprint": parquet_fingerprint(cfg)})


def parquet_fingerprint(cfg) -> str:
    """What Ray Data read: every Parquet file of `data.path` (and `data.valid_path`) by
    its relative path and content digest, and the split that divided them."""
    import pyarrow.fs as pafs

    parts = [json.dumps([cfg.data.valid_fraction, cfg.data.split_seed])]
    for role, uri in (("train", cfg.data.path), ("valid", cfg.data.valid_path)):
        if not uri:
            continue
        fs, root = filesystem(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            paths = sorted(
                f.path
                for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))
            )
        else:
            paths = [root]
        prefix = root.rstrip("/") + "/"
        parts.append(role)
        parts += [f"{p.removeprefix(prefix)}={d}" for p, d in zip(paths, file_digests(fs, paths))]
    return fingerprint(*parts)
