"""The console's line per trial, as a Tune callback (apart from rayline.pipelines, which
must not import Tune before Ray starts)."""

from __future__ import annotations

from typing import Any

from ray import tune


class TrialLines(tune.Callback):
    """One line per trial that ends: its metric and the values it was given for the swept
    keys. Tune's own tables list every config key; a sweep's config holds them all."""

    def __init__(self, metric: str, swept: list[str], progress=lambda result: None):
        self.metric = metric
        self.swept = swept
        self.progress = progress
        self.ended = 0
        self.total = 0

    def setup(self, total_num_samples: int = 0, **info):
        self.ended, self.total = 0, total_num_samples

    def on_trial_result(self, iteration, trials, trial, result, **info):
        lines = self.progress(result)
        for line in lines.splitlines() if lines else []:
            print(f"[{trial.trial_id}] {line}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial, f"{self.metric}={_short(trial.last_result.get(self.metric))}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "FAILED (see its error.txt)")

    def _line(self, trials, trial, outcome: str) -> None:
        self.ended += 1
        values = []
        for dotted in self.swept:
            node = trial.config
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values.append(f"{dotted}={_short(node)}")
        line = f"[{self.ended}/{self.total or len(trials)}] {trial.trial_id}: {outcome}"
        print(" ".join([line, *values]), flush=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
