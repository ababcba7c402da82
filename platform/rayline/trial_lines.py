"""The driver's Tune callbacks: the console's line per trial, and the registration's
imports made while trials run (apart from rayline.pipelines, which must not import Tune
before Ray starts)."""

from __future__ import annotations

from typing import Any

from ray import tune

from rayline.startup import import_in_background


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


class WarmImports(tune.Callback):
    """Imports `modules` in a background thread at the first trial result: by then the
    trials' start-up, which every CPU is busy with, is over, and the driver waits on
    Tune; at the end, registration finds them imported (torch is 1.5 s on 2 cores)."""

    def __init__(self, modules: tuple[str, ...]):
        self.modules = list(modules)
        self.started = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.modules and not self.started:
            self.started = True
            import_in_background(self.modules)


class ForgetEncodedStates(tune.Callback):
    """Tune saves its experiment state with an encoder that, for each value JSON cannot
    hold (each metric's window of recent values, a deque that differs at every save),
    remembers a "log once" key made of its text, for ever: a DQN driver grew by 1.9 MB
    an hour from it alone (tracemalloc). The keys are forgotten at each result; nothing
    was logged for them (Tune logs that fallback at debug level)."""

    PREFIX = "tune_func_encode:"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from rayline import raycompat

        raycompat.forget_log_once_keys(self.PREFIX)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
