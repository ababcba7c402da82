"""Each trial of a run as an MLflow run (docs/mlflow.md): the driver's Tune callback.
Made only when `run.mlflow.tracking_uri` is set; every MLflow call goes through one
background thread (rayline.mlflow_sync.Calls), so a slow or absent server never holds a
trial back."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from rayline import mlflow_sync
from rayline.config import to_dict
from rayline.family import TUNE_KEYS
from rayline.store import ModelRegistry, ModelVersion


class MLflowTracking(tune.Callback):
    """One MLflow run per trial (nested under one run of the sweep), the trial's config
    as parameters, every reported number as a series against the family's own step
    (`Pipeline.step_key`), the stop reason and the registered version as tags."""

    def __init__(self, settings, tags: dict[str, str], config: dict, sweep: bool, step_key: str):
        self.settings, self.tags, self.config = settings, tags, config
        self.sweep, self.step_key = sweep, step_key
        self.state: dict[str, Any] | None = None
        self.restored: dict[str, Any] | None = None
        """The MLflow ids of a run resumed with `--resume` (Tune's `set_state`)."""

    def __getstate__(self):  # Tune keeps its callbacks with the experiment; not the client
        return {**self.__dict__, "state": None}

    def get_state(self) -> dict | None:
        """The MLflow ids, saved by Tune with each experiment checkpoint: a resumed run
        goes on in the same sweep run and trial runs, not in new ones."""
        if self.state is None:
            return self.restored
        keys = ("experiment_id", "parent_run")
        return {**{k: self.state[k] for k in keys}, "runs": dict(self.state["runs"])}

    def set_state(self, state: dict) -> None:
        self.restored = state

    def _calls(self) -> mlflow_sync.Calls:
        if self.state is None:
            restored = self.restored or {}
            self.state = {
                "client": mlflow_sync.client(self.settings.tracking_uri, self.settings.timeout_s),
                "calls": mlflow_sync.Calls(self.settings.tracking_uri),
                "experiment_id": restored.get("experiment_id"),
                "parent_run": restored.get("parent_run"),
                "runs": dict(restored.get("runs", {})),  # Tune's trial id -> MLflow run id
            }
            resumed = self.state["experiment_id"] is not None
            self.state["calls"].submit(self._resume if resumed else self._start)
        return self.state["calls"]

    def _resume(self) -> None:
        """The sweep's run, ended KILLED by the interruption, runs again."""
        if self.state["parent_run"]:
            self.client.update_run(self.state["parent_run"], status="RUNNING")

    @property
    def client(self):
        return self.state["client"]

    def _start(self) -> None:
        name = self.settings.experiment or self.tags["rayline.run_name"]
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        self.state["experiment_id"] = experiment_id
        if self.sweep:
            run = self.client.create_run(
                experiment_id,
                run_name=f"{self.tags['rayline.run_name']} sweep",
                tags={**self.tags, "rayline.sweep": "true"},
            )
            self.state["parent_run"] = run.info.run_id
            mlflow_sync.log_params(
                self.client, run.info.run_id, mlflow_sync.flat_params(self.config)
            )

    def setup(self, **info):
        self._calls()

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id, config, title = trial.trial_id, dict(trial.config), str(trial)

        def create() -> None:
            if trial_id in self.state["runs"]:  # a trial restarted after a failure
                return
            if self.restored and self._adopt(trial_id):
                return
            tags = {**self.tags, "rayline.trial_id": trial_id}
            if self.state["parent_run"]:
                tags["mlflow.parentRunId"] = self.state["parent_run"]
            run = self.client.create_run(self.state["experiment_id"], run_name=title, tags=tags)
            self.state["runs"][trial_id] = run.info.run_id
            mlflow_sync.log_params(self.client, run.info.run_id, mlflow_sync.flat_params(config))

        self._calls().submit(create)

    def _adopt(self, trial_id: str) -> bool:
        """A resumed run's trial whose MLflow run was made after Tune's last save of this
        callback's state (the interruption came while its creation was queued): take
        that run again rather than make a second one."""
        tags = f"tags.`rayline.trial_id` = '{trial_id}'"
        if self.state["parent_run"]:
            tags += f" and tags.`mlflow.parentRunId` = '{self.state['parent_run']}'"
        found = self.client.search_runs([self.state["experiment_id"]], tags, max_results=1)
        if found:
            self.state["runs"][trial_id] = found[0].info.run_id
        return bool(found)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        step = int(result.get(self.step_key) or result.get("training_iteration") or 0)
        stamp = int(time.time() * 1000)
        values = mlflow_sync.numeric_metrics(result, TUNE_KEYS)
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        trial_id = trial.trial_id

        def log() -> None:
            run_id = self.state["runs"][trial_id]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

        self._calls().submit(log)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        trial_id = trial.trial_id
        stop = (trial.last_result or {}).get("stop_reason")

        def end() -> None:
            run_id = self.state["runs"][trial_id]
            if stop:
                self.client.set_tag(run_id, "rayline.stop_reason", str(stop))
            self.client.set_terminated(run_id, status)

        self._calls().submit(end)

    def registered(self, trial_id: str, version: ModelVersion, registry: ModelRegistry) -> None:
        """Tag the best trial's run with the version registered from it and its place."""
        uri = mlflow_sync.version_uri(registry, version)

        def tag() -> None:
            run_id = self.state["runs"][trial_id]
            self.client.set_tag(run_id, "rayline.registered", f"{version.name} v{version.version}")
            self.client.set_tag(run_id, "rayline.model_uri", uri)

        self._calls().submit(tag)

    def finish(self, status: str = "FINISHED") -> None:
        """End the sweep's run; wait for what MLflow is still owed while it answers (up
        to run.mlflow.timeout_s without an answer), and say how much was never sent."""
        calls = self._calls()

        def end() -> None:
            if self.state["parent_run"]:
                self.client.set_terminated(self.state["parent_run"], status)

        calls.submit(end)
        left = calls.drain(self.settings.timeout_s)
        if left:
            mlflow_sync.warn(
                f"{left} tracking calls to {mlflow_sync.shown(self.settings.tracking_uri)} not "
                f"made (refused, or unanswered for run.mlflow.timeout_s="
                f"{self.settings.timeout_s:g} s); the run and its registration are complete "
                f"in rayline"
            )


def tracking_callback(pipeline, cfg, sweep: bool) -> MLflowTracking | None:
    """The callback for this run, or None when `run.mlflow.tracking_uri` is empty."""
    settings = cfg.run.mlflow
    if not settings.tracking_uri:
        return None
    tags = {
        "rayline.pipeline": pipeline.name,
        "rayline.family": pipeline.trainable.__module__.split(".")[1],
        "rayline.run_name": cfg.run.name,
    }
    return MLflowTracking(
        settings, tags, to_dict(cfg), sweep, pipeline.step_key or pipeline.time_attr
    )
