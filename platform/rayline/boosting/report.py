"""What a boosting trial tells Tune: progress at the rounds ASHA compares trials at,
mid-run checkpoints to resume from, and the final report that carries the model.

The final checkpoint is written after boosting ends (ray-project/ray#40705: a callback
that checkpoints every N rounds misses the final model), and the score in that report is
computed from the saved model at its best round, so the registered model reproduces it
exactly (ray-project/ray#20267).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import xgboost as xgb

from rayline.boosting.config import XGBoostConfig, max_rounds
from rayline.boosting.data import Table, Task
from rayline.boosting.model import MODEL_FILE, BoostedModel
from rayline.boosting.train import BestRound

STATE_FILE = "state.json"


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


def restore(directory: str, task: Task, patience: int):
    booster = xgb.Booster(model_file=os.path.join(directory, MODEL_FILE))
    state = json.loads(Path(directory, STATE_FILE).read_text())
    return booster, BestRound(task, patience, state["best_score"], state["best_iteration"])
