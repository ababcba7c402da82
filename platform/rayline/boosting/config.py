"""The XGBoost pipeline's config: one typed object, logged and checkpointed."""

from __future__ import annotations

import dataclasses
from typing import Literal

from rayline.boosting.train import RoundsConfig, TreeParams
from rayline.config import RunConfig, SweepConfig, bounded, named

OBJECTIVES = ("auto", "binary:logistic", "multi:softprob", "reg:squarederror", "reg:absoluteerror")


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


def max_rounds(cfg: XGBoostConfig) -> int:
    """The largest budget a trial of this sweep can ask for (ASHA's max_t)."""
    spec = cfg.sweep.params.get("train.rounds")
    if not spec:
        return cfg.train.rounds
    ((kind, values),) = spec.items()
    return int(max(values)) if kind != "randint" else int(values[1]) - 1
