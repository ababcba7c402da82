"""MLflow beside rayline's own records (docs/mlflow.md): the MLflow Model Registry kept in
step with rayline's, which stays the source of truth, and the client and background
calls that rayline.mlflow_tracking (each trial an MLflow run) uses too.

Everything here runs in the driver (`rayline train`/`sweep`, a `ray job submit`
entrypoint, the `rayline models` verbs), never in a Ray worker: credentials come from
MLflow's own environment variables there (MLFLOW_TRACKING_TOKEN, ..._USERNAME,
..._PASSWORD) and are never put in a runtime env, a log or a Ray process
(rayline.startup.init_ray starts a local Ray without them).

An MLflow that is down, slow or refuses the credentials never stops or slows a run:
every call has `run.mlflow.timeout_s` and no retries, tracking calls go through one
background thread, and the first failure is one warning line; the registry is brought
back in step by the next `rayline models` verb or `rayline models sync NAME --mlflow URI`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rayline.store import LATEST, ModelRegistry, ModelVersion

PARAM_LIMIT = 6000
"""MLflow's longest parameter value (characters)."""
BATCH_LIMIT = 100
"""Parameters (and tags) per log_batch call: MLflow's limit."""
DRAIN_PATIENCE = 6
"""How many `timeout_s` a drain waits in all while MLflow answers: a sweep's last calls
took over 10 s on a loaded machine; a server that answers each call just inside its
timeout must not hold a run's end for the whole queue."""
QUEUE_LIMIT = 50_000
"""Tracking calls held while MLflow does not answer; past it the oldest are dropped and
counted."""


def client(tracking_uri: str, timeout_s: float):
    """An MlflowClient for `tracking_uri` (tracking and registry) whose HTTP calls give up
    after `timeout_s` without retrying (MLflow's defaults: 120 s and 7 retries with
    backoff, minutes for one call to a server that is down)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    # rayline's console says what it mirrored; not MLflow's links and polling notes
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_setting(uri: str, what: str) -> None:
    """A ConfigError (exit 2, before Ray starts or an alias moves) naming `what` when the
    mlflow package, an optional extra, is not installed, or when `uri` is a folder: MLflow
    3 takes its file store (in maintenance mode) only with MLFLOW_ALLOW_FILE_STORE=true.
    Either would otherwise surface mid-way: an ImportError, an error at the first trial."""
    from rayline.config import ConfigError

    try:
        import mlflow  # noqa: F401  (what every MLflow call here needs, loaded once)
    except ImportError:
        raise ConfigError(
            f"{what}: needs the mlflow package, which is not installed "
            "(pip install 'rayline[mlflow]')"
        ) from None
    if urlsplit(uri).scheme not in ("", "file"):
        return
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return
    raise ConfigError(
        f"{what}: {uri} is a folder, which MLflow 3 takes as a tracking store only with "
        "MLFLOW_ALLOW_FILE_STORE=true (its file store is in maintenance mode); use "
        "sqlite:///PATH/mlflow.db or a tracking server's http:// URI"
    )


BAD_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(key: str) -> str:
    """A metric, parameter or tag name as MLflow takes it (letters, digits, `_ - . : /`
    and spaces): `valid_ndcg@10` becomes `valid_ndcg_at_10`, any other character `_`. The
    server refuses the whole batch a name it cannot take is in."""
    return BAD_NAME_CHARACTERS.sub("_", key.replace("@", "_at_"))


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, values as text."""
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{dotted}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[mlflow_name(dotted)] = text[:PARAM_LIMIT]
    return out


def numeric_metrics(result: Mapping[str, Any], skip: frozenset[str]) -> dict[str, float]:
    """A Tune result's finite numbers (bools as 0/1), without Tune's bookkeeping, named as
    MLflow takes them (`mlflow_name`)."""
    out = {}
    for key, value in result.items():
        if key in skip or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            out[mlflow_name(key)] = value
    return out


def shown(uri: str) -> str:
    """`uri` as it may appear on a console: without a user or password in it."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def warn(message: str) -> None:
    print(f"rayline: MLflow: {message}", file=sys.stderr, flush=True)


def reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


# -- tracking ------------------------------------------------------------------------------


class Calls:
    """MLflow calls made in order by one background thread. A call that fails is tried
    again (every `retry_s`) before the next, so nothing is skipped while MLflow is down;
    the first failure of an outage is one warning line. `drain` waits for the rest while
    MLflow answers, and gives up once it has answered nothing for its timeout."""

    def __init__(self, uri: str, retry_s: float = 15.0):
        self.uri, self.retry_s = uri, retry_s
        self.pending: collections.deque = collections.deque()
        self.dropped = 0
        self.answered = 0
        """Calls done or refused: `drain` waits on while this moves."""
        self.refused = 0
        """Calls MLflow answered with a refusal (a 4xx), each dropped, not retried."""
        self.wake = threading.Condition()
        self.outage = False
        self.thread = threading.Thread(target=self._work, name="rayline-mlflow", daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        with self.wake:
            if len(self.pending) >= QUEUE_LIMIT:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(call)
            self.wake.notify()

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.pending:
                    self.wake.wait()
                call = self.pending[0]
            try:
                call()
            except Exception as exc:
                if refused(exc):  # MLflow answered no: trying again would block the rest
                    if not self.refused:
                        warn(f"{shown(self.uri)} refused a call ({reason(exc)}); dropped")
                    self.refused += 1
                    with self.wake:
                        self.pending.popleft()
                        self.answered += 1
                        self.wake.notify_all()
                    continue
                if not self.outage:
                    warn(
                        f"{shown(self.uri)} did not answer ({reason(exc)}); the run goes on "
                        f"and its tracking catches up when it answers"
                    )
                self.outage = True
                time.sleep(self.retry_s)
                continue
            if self.outage:
                warn(f"{shown(self.uri)} answers again; catching up")
                self.outage = False
            with self.wake:
                self.pending.popleft()
                self.answered += 1
                self.wake.notify_all()

    def drain(self, timeout_s: float) -> int:
        """Wait for the calls held while MLflow answers them, until one has gone
        unanswered for `timeout_s` (or DRAIN_PATIENCE x `timeout_s` in all); the number
        never made (still held, dropped past QUEUE_LIMIT, or refused). A slow server is
        waited for: a sweep's last calls, queued behind its trials' results on a loaded
        machine, were lost when the wait was `timeout_s` for the whole queue."""
        started = time.monotonic()
        give_up = started + DRAIN_PATIENCE * timeout_s
        deadline, answered = started + timeout_s, self.answered
        with self.wake:
            while self.pending and time.monotonic() < deadline:
                self.wake.wait(timeout=max(0.0, deadline - time.monotonic()))
                if self.answered != answered:
                    answered = self.answered
                    deadline = min(give_up, time.monotonic() + timeout_s)
            return len(self.pending) + self.dropped + self.refused


def refused(exc: BaseException) -> bool:
    """Whether MLflow answered and said no (an HTTP 4xx: a name it cannot take, a value
    too long, a run gone), as against not answering at all."""
    status = getattr(exc, "get_http_status_code", None)
    try:
        return callable(status) and 400 <= int(status()) < 500
    except (TypeError, ValueError):
        return False


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), BATCH_LIMIT):
        mlflow_client.log_batch(run_id, params=items[start : start + BATCH_LIMIT])


# -- the Model Registry ----------------------------------------------------------------------


def version_uri(registry: ModelRegistry, version: ModelVersion) -> str:
    """Where rayline keeps a version's files: the source of its MLflow model version."""
    uri = registry.uri.rstrip("/")
    if "://" not in uri:
        uri = "file://" + os.path.abspath(uri)
    return f"{uri}/models/{version.name}/{version.version}"


def version_tags(version: ModelVersion) -> dict[str, str]:
    """What an MLflow model version carries of its rayline version: kind, number, data
    fingerprint, and the registration's metrics (re-evaluated figures included)."""
    tags = {
        "rayline.version": str(version.version),
        "rayline.kind": version.kind,
        "rayline.data_fingerprint": version.data_fingerprint,
        "rayline.created_at": version.created_at,
    }
    for key, value in version.metrics.items():
        if isinstance(value, (bool, int, float, str)):
            tags[mlflow_name(f"rayline.metric.{key}")] = str(value)[:PARAM_LIMIT]
    return tags


REGISTRY_EXPERIMENT = "rayline-registry"
"""Where a version registered without a tracked run gets the MLflow run that holds its
files (a version's files live in an MLflow run's artifacts)."""
MODEL_ARTIFACTS = "rayline-model"
"""The artifact folder of a version's files in its MLflow run."""


def version_run(mlflow_client, version: ModelVersion) -> str:
    """The MLflow run that holds `version`'s files: the tracked trial it was registered
    from (tag `rayline.registered`), else a run of its own in REGISTRY_EXPERIMENT."""
    label = f"{version.name} v{version.version}"
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    found = mlflow_client.search_runs(
        experiments, filter_string=f"tags.`rayline.registered` = '{label}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    experiment = mlflow_client.get_experiment_by_name(REGISTRY_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else mlflow_client.create_experiment(REGISTRY_EXPERIMENT)
    )
    run = mlflow_client.create_run(
        experiment_id, run_name=label, tags={"rayline.registered": label}
    )
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def upload_files(mlflow_client, registry: ModelRegistry, version: ModelVersion, run_id: str):
    """The version's files (checked against their hashes as they are read) into the run's
    MODEL_ARTIFACTS folder, unless a previous sync put them there already."""
    import tempfile

    present = {a.path for a in mlflow_client.list_artifacts(run_id, MODEL_ARTIFACTS)}
    wanted = {f"{MODEL_ARTIFACTS}/{filename}" for filename in version.files}
    if wanted <= present:
        return
    with tempfile.TemporaryDirectory(prefix="rayline-mlflow-") as folder:
        for filename, data in registry.read_files(version).items():
            with open(os.path.join(folder, filename), "wb") as f:
                f.write(data)
        mlflow_client.log_artifacts(run_id, folder, MODEL_ARTIFACTS)


def sync_model(mlflow_client, registry: ModelRegistry, name: str) -> list[str]:
    """Bring MLflow's registered model `name` in step with rayline's: a model version per
    rayline version (found by its `rayline.version` tag, so MLflow's own numbering may
    differ) whose files are artifacts of the run it was trained in (or of a run of its
    own), each alias where rayline has it (and none rayline does not), each refused
    promotion as a tag of its candidate. Idempotent; returns what it changed."""
    from mlflow.exceptions import MlflowException

    changes: list[str] = []
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        model = mlflow_client.create_registered_model(
            name, tags={"rayline.store": shown(registry.uri)}, description="mirrored from rayline"
        )
        changes.append(f"created model {name}")
    mirrored: dict[int, Any] = {}
    for found in mlflow_client.search_model_versions(f"name='{name}'"):
        number = found.tags.get("rayline.version")
        if number and number.isdigit():
            mirrored[int(number)] = found
    for version in registry.list(name):
        if version.version in mirrored or getattr(version, "broken", False):
            continue
        run_id = version_run(mlflow_client, version)
        upload_files(mlflow_client, registry, version, run_id)
        created = mlflow_client.create_model_version(
            name,
            source=f"runs:/{run_id}/{MODEL_ARTIFACTS}",
            run_id=run_id,
            tags=version_tags(version) | {"rayline.source": shown(version_uri(registry, version))},
            description=f"rayline {name} v{version.version} ({version.kind})",
        )
        mirrored[version.version] = created
        changes.append(f"version v{version.version} -> MLflow {created.version}")
    current = dict(getattr(model, "aliases", {}) or {})
    wanted = {  # `latest` is derived in both registries (and reserved in MLflow's)
        alias: str(mirrored[number].version)
        for alias, number in registry.aliases(name).items()
        if number in mirrored and alias != LATEST
    }
    for alias, mlflow_version in wanted.items():
        if str(current.get(alias)) != mlflow_version:
            mlflow_client.set_registered_model_alias(name, alias, mlflow_version)
            changes.append(f"alias {alias} -> MLflow {mlflow_version}")
    for alias in current:
        if alias not in wanted:
            mlflow_client.delete_registered_model_alias(name, alias)
            changes.append(f"alias {alias} removed")
    for event in registry.history(name):
        if event.get("event") != "promotion_refused" or event.get("version") not in mirrored:
            continue
        candidate = mirrored[event["version"]]
        key = f"rayline.promotion_refused.{event.get('alias', 'production')}"
        value = json.dumps(
            {k: event.get(k) for k in ("time", "holder", "min_delta", "comparison")},
            sort_keys=True,
            default=str,
        )[:PARAM_LIMIT]
        if candidate.tags.get(key) != value:
            mlflow_client.set_model_version_tag(name, str(candidate.version), key, value)
            candidate.tags[key] = value
            changes.append(f"refusal of v{event['version']} for {event.get('alias')}")
    return changes


def mirror(tracking_uri: str, registry: ModelRegistry, name: str, timeout_s: float = 10.0) -> bool:
    """`sync_model` where a failure is one warning line, never an error: rayline's
    registry is already updated, and `rayline models sync` repairs MLflow later."""
    if not tracking_uri:
        return True
    try:
        sync_model(client(tracking_uri, timeout_s), registry, name)
        return True
    except Exception as exc:
        where = shown(tracking_uri)
        warn(
            f"{name} not mirrored to {where} ({reason(exc)}); rayline's registry is "
            f"updated: run `rayline models sync {name} --mlflow {where}` when it answers"
        )
        return False


def record_state(registry: ModelRegistry, name: str) -> tuple:
    """What of model `name`'s rayline record MLflow mirrors: its versions, its aliases
    and how many events its history holds (a rollback, a refused promotion)."""
    return (
        tuple(registry.versions(name)),
        tuple(sorted(registry.aliases(name).items())),
        len(registry.history(name)),
    )


def follow(
    tracking_uri: str,
    registry: ModelRegistry,
    names: list[str],
    stop: threading.Event,
    period_s: float = 10.0,
    timeout_s: float = 10.0,
) -> None:
    """`rayline serve --mlflow URI`, in a thread of the serving driver: at once and then
    every `period_s` until `stop` is set, each model of `names` whose record moved since
    it was last mirrored (a canary a replica rolled back, a promotion made elsewhere) is
    synced (`sync_model`), one line per change. The driver holds MLflow's credentials;
    the replicas never do, so this is how their rollbacks reach MLflow while they
    happen. A model MLflow cannot take is one warning line until it can again."""
    mirrored: dict[str, tuple] = {}
    failing: set[str] = set()
    mlflow_client = None
    while True:
        for name in names:
            try:
                state = record_state(registry, name)
            except Exception:  # a store file being written: the next period reads it
                continue
            if mirrored.get(name) == state:
                continue
            try:
                mlflow_client = mlflow_client or client(tracking_uri, timeout_s)
                changes = sync_model(mlflow_client, registry, name)
            except Exception as exc:
                if name not in failing:
                    failing.add(name)
                    warn(
                        f"{name} not mirrored to {shown(tracking_uri)} ({reason(exc)}); "
                        f"retried every {period_s:g} s"
                    )
                continue
            if name in failing:
                failing.discard(name)
                print(f"rayline: MLflow: {name} mirrored again", flush=True)
            mirrored[name] = state
            for change in changes:
                print(f"rayline: MLflow: {name}: {change}", flush=True)
        if stop.wait(period_s):
            return
