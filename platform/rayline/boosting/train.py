"""Boosting rounds with XGBoost's native API: the parameters, the best-round tracker with
early stopping, and `fit`, which any caller (a Tune trial, a Ray Train worker, a test)
drives with its own callbacks.

Chen & Guestrin, XGBoost: A Scalable Tree Boosting System, KDD 2016.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import xgboost as xgb

from rayline.boosting.data import Task
from rayline.boosting.metrics import HIGHER_IS_BETTER
from rayline.boosting.model import BoostedModel
from rayline.config import bounded

VALID = "valid"
"""The name XGBoost's evaluation log uses for the validation set."""


@dataclasses.dataclass
class TreeParams:
    """XGBoost's booster parameters (native names; `reg_lambda`/`reg_alpha` are its
    aliases of `lambda`/`alpha`)."""

    eta: float = bounded(0.3, gt=0.0, le=1.0)
    """Learning rate: the shrinkage applied to each new tree."""
    max_depth: int = bounded(6, ge=0)
    """Deepest a tree grows (0: no limit, only with tree_method hist)."""
    min_child_weight: float = bounded(1.0, ge=0.0)
    """Smallest hessian sum a leaf may hold."""
    subsample: float = bounded(1.0, gt=0.0, le=1.0)
    """Fraction of rows sampled for each tree."""
    colsample_bytree: float = bounded(1.0, gt=0.0, le=1.0)
    """Fraction of features sampled for each tree."""
    reg_lambda: float = bounded(1.0, ge=0.0)
    """L2 penalty on leaf weights."""
    reg_alpha: float = bounded(0.0, ge=0.0)
    """L1 penalty on leaf weights."""
    max_bin: int = bounded(256, ge=2)
    """Histogram bins per feature."""
    tree_method: Literal["hist", "approx", "exact"] = "hist"
    """How split candidates are found; `hist` is fastest and supports categories."""


@dataclasses.dataclass
class RoundsConfig:
    rounds: int = bounded(200, ge=1)
    """Boosting rounds (trees per class) at most."""
    early_stopping_rounds: int = bounded(20, ge=0)
    """Stop after this many rounds without a better validation loss (0: never)."""
    report_every: int = bounded(0, ge=0)
    """Rounds between results sent to Tune; 0 reports only where ASHA decides (its rung
    milestones) and at the end. Each report costs a round trip to the Tune driver: small
    trials spend more time reporting than boosting if they report every round."""
    checkpoint_every: int = bounded(0, ge=0)
    """Rounds between mid-trial checkpoints a resumed trial continues from (0: only the
    final model is checkpointed)."""
    threads: int = bounded(1, ge=1)
    """XGBoost threads per trial; the trial reserves as many CPUs."""


def booster_params(params: TreeParams, task: Task, *, threads: int, seed: int) -> dict[str, Any]:
    result = dataclasses.asdict(params)
    result.update(
        objective=task.objective,
        eval_metric=list(task.eval_metrics),
        nthread=threads,
        seed=seed,
        verbosity=0,
    )
    if task.num_class:
        result["num_class"] = task.num_class
    return result


class BestRound(xgb.callback.TrainingCallback):
    """Tracks the round with the best validation loss and stops after `patience` rounds
    without improvement. Carries its state across a resume."""

    def __init__(
        self, task: Task, patience: int, best_score: float | None = None, best_iteration: int = 0
    ):
        self.metric = task.eval_metrics[0]
        self.patience = patience
        self.best_score = best_score
        self.best_iteration = best_iteration
        self.last: dict[str, float] = {}

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        self.last = {name: float(values[-1]) for name, values in evals_log[VALID].items()}
        score = self.last[self.metric]
        better = self.best_score is None or (
            score > self.best_score if self.metric in HIGHER_IS_BETTER else score < self.best_score
        )
        if better:
            self.best_score, self.best_iteration = score, epoch
        return bool(self.patience) and epoch - self.best_iteration >= self.patience

    def progress(self, rounds: int) -> dict[str, float]:
        """What a trial reports after `rounds` rounds: the latest validation metrics, and
        as `valid_loss` the best so far (what the trial is worth if stopped now)."""
        metrics = {f"valid_{name}": value for name, value in self.last.items()}
        metrics.update(
            valid_loss=self.best_score,
            best_iteration=self.best_iteration,
            rounds=rounds,
            timesteps_total=rounds,  # Tune's step: TensorBoard's x-axis is rounds
        )
        return metrics


def fit(
    params: dict[str, Any],
    task: Task,
    dtrain: xgb.DMatrix,
    dvalid: xgb.DMatrix,
    *,
    rounds: int,
    tracker: BestRound,
    callbacks: Sequence[xgb.callback.TrainingCallback] = (),
    start_from: xgb.Booster | None = None,
    categories: dict[str, list[str]] | None = None,
) -> BoostedModel:
    """Boost up to `rounds` rounds in all (counting those already in `start_from`),
    evaluating on `dvalid` each round; `tracker` runs before `callbacks`."""
    done = start_from.num_boosted_rounds() if start_from is not None else 0
    booster = xgb.train(
        params,
        dtrain,
        num_boost_round=rounds - done,
        evals=[(dvalid, VALID)],
        verbose_eval=False,
        callbacks=[tracker, *callbacks],
        xgb_model=start_from,
    )
    return BoostedModel(
        booster,
        task,
        list(dtrain.feature_names or []),
        list(dtrain.feature_types or []),
        categories or {},
        tracker.best_iteration,
        booster.num_boosted_rounds(),
    )
