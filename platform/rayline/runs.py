"""Past runs, read back from where Tune keeps them (`run.storage_path`, local or
`s3://`/`gs://`): `rayline runs list` and `rayline runs show NAME`.

Each run's folder holds Tune's own state (its trials, their statuses and results) and
rayline's record of the run, `rayline_run.json`: the pipeline, the metric, how it ended
and the model it registered. The record is written when the run starts and again when it
ends; a run whose driver was killed keeps "running" with the driver's host and pid, and is
reported as interrupted once that process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pyarrow.fs as pafs

from rayline.config import NAME_PATTERN, ConfigError
from rayline.fs import atomic_write, filesystem, process_gone

RUN_FILE = "rayline_run.json"


def run_path(storage: str, name: str) -> str:
    """Where Tune keeps run `name` under `storage` (a path or URI)."""
    if "://" in storage:
        return f"{storage.rstrip('/')}/{name}"
    return os.path.join(os.path.abspath(storage), name)


def show(storage: str, name: str) -> dict:
    """One run's summary; a name that is not one folder name, or no such run, is an
    error naming the runs there are."""
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{name!r}: a run name is one folder name (letters, digits, . _ -)")
    found = summary(run_path(storage, name))
    if found is None:
        known = ", ".join(r["name"] for r in list_runs(storage)) or "none"
        raise ConfigError(f"no run {name!r} under {storage} (runs: {known})")
    return found


def record(experiment: str, **fields: Any) -> None:
    """Merge `fields` into the run's record (atomically)."""
    fs, path = filesystem(experiment)
    fs.create_dir(path, recursive=True)
    current = _read_record(fs, f"{path}/{RUN_FILE}") or {}
    current.update(fields, updated_at=time.time())
    body = json.dumps(current, indent=2, sort_keys=True, default=str).encode()
    atomic_write(fs, f"{path}/{RUN_FILE}", lambda out: out.write(body))


def started(
    experiment: str, pipeline: str, name: str, sweep: bool, metric: str, mode: str, resume: bool
) -> None:
    """The run's record as its driver starts (or resumes) it."""
    when = {"resumed_at" if resume else "started_at": time.time()}
    record(
        experiment,
        name=name,
        pipeline=pipeline,
        command="sweep" if sweep else "train",
        metric=metric,
        mode=mode,
        status="running",
        driver={"host": socket.gethostname(), "pid": os.getpid()},
        error=None,
        **when,
    )


def _read_record(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _driver_gone(driver: dict | None) -> bool:
    """True when the run's driver was on this host and its process no longer exists."""
    if not driver or driver.get("host") != socket.gethostname():
        return False
    try:
        return process_gone(int(driver["pid"]))
    except (ValueError, TypeError):
        return False


def _trials(experiment: str, metric: str | None, mode: str | None) -> list[dict]:
    """Each trial of the run, from Tune's experiment state: name, status, best metric."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(experiment)
    except Exception:  # no state yet (killed before Tune saved any), or not a Tune run
        return []
    trials = []
    for trial in analysis.trials:
        best = None
        if metric and metric in trial.metric_analysis:
            best = trial.metric_analysis[metric].get(mode or "max")
        trials.append(
            {
                "trial": str(trial),
                "status": trial.status,
                "best": best,
                "iterations": (trial.last_result or {}).get("training_iteration"),
            }
        )
    return trials


def summary(experiment: str) -> dict | None:
    """One run's summary, or None when the folder holds no run."""
    fs, path = filesystem(experiment)
    run = _read_record(fs, f"{path}/{RUN_FILE}")
    has_tune_state = any(
        info.base_name.startswith("experiment_state")
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    )
    if run is None and not has_tune_state:
        return None
    run = run or {"name": os.path.basename(path.rstrip("/"))}
    trials = _trials(experiment, run.get("metric"), run.get("mode"))
    status = run.get("status")
    if status == "running" and _driver_gone(run.get("driver")):
        status = "interrupted"
    if status is None:  # a run rayline did not record: judge by its trials
        statuses = {t["status"] for t in trials}
        status = (
            "failed"
            if "ERROR" in statuses
            else "finished"
            if statuses == {"TERMINATED"}
            else "interrupted"
        )
    values = [t["best"] for t in trials if t["best"] is not None]
    best = None
    if values:
        best = min(values) if run.get("mode") == "min" else max(values)
    return {
        **run,
        "status": status,
        "path": experiment,
        "trials": trials,
        "best": best,
    }


def list_runs(storage: str) -> list[dict]:
    """Every run under `storage`, newest first."""
    fs, path = filesystem(storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"--storage {storage}: no such folder")
    runs = []
    for entry in fs.get_file_info(pafs.FileSelector(path)):
        if entry.type != pafs.FileType.Directory:
            continue
        found = summary(run_path(storage, entry.base_name))
        if found is not None:
            runs.append(found)
    return sorted(runs, key=lambda r: r.get("started_at") or 0, reverse=True)
