"""What the serving replicas export through Ray's metrics (which the cluster hands to
Prometheus): requests, errors and latency per route template; per model version,
answers by role and status, latency, the canary's share and rollbacks, drift and shadow
agreement. The names are the ones deploy/grafana/rayline.json charts.

Per-request figures are kept in this process and handed to Ray once a second
(`Recorder.flush`), not recorded on the request's path: each call into Ray's metrics
costs far more under load than its own few microseconds suggest (recorded per request,
the four calls of a DQN answer took a gateway replica from 1,990 to 1,390 requests a
second at concurrency 32; docs/benchmarks.md). A replica that dies loses at most the last
second of its counts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from typing import Any

LATENCY_MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
FLUSH_S = 1.0
"""How often a replica hands its counts and observations to Ray's metrics."""

Tags = tuple[tuple[str, str], ...]


class Recorder:
    """Counts and observations of this process, kept as plain numbers and handed to Ray's
    metrics by `flush` (one `inc` per metric and tag set, one `observe` per observation:
    Ray's histograms take one value at a time)."""

    def __init__(self):
        self.counts: defaultdict[tuple[Any, Tags], float] = defaultdict(float)
        self.observed: defaultdict[tuple[Any, Tags], list[float]] = defaultdict(list)

    def inc(self, counter, tags: Tags, value: float = 1.0) -> None:
        self.counts[counter, tags] += value

    def observe(self, histogram, tags: Tags, value: float) -> None:
        self.observed[histogram, tags].append(value)

    def flush(self) -> None:
        counts, self.counts = self.counts, defaultdict(float)
        observed, self.observed = self.observed, defaultdict(list)
        for (counter, tags), value in counts.items():
            counter.inc(value, dict(tags))
        for (histogram, tags), values in observed.items():
            tag_dict = dict(tags)
            for value in values:
                histogram.observe(value, tag_dict)

    async def run(self, period_s: float = FLUSH_S) -> None:
        """Flush every `period_s` for as long as the replica lives."""
        while True:
            await asyncio.sleep(period_s)
            self.flush()


class RouteMetrics:
    """Requests, errors (status >= 400) and latency per route template and method."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.ready = False

    def _setup(self) -> None:
        from ray.util import metrics

        tags = ("route", "method", "status")
        self.requests = metrics.Counter(
            "rayline_requests", description="HTTP requests answered", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "rayline_request_errors", description="HTTP answers with status >= 400", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "rayline_request_latency_ms",
            description="time from request to response",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("route", "method"),
        )
        self.ready = True

    def record(self, scope: dict, status: int, started: float) -> None:
        if not self.ready:
            self._setup()
        matched = scope.get("route")
        route = getattr(matched, "path", "unmatched")  # the template: no ids in the label
        method = scope.get("method", "")
        where = (("route", route), ("method", method))
        tags = (*where, ("status", str(status)))
        self.recorder.inc(self.requests, tags)
        if status >= 400:
            self.recorder.inc(self.errors, tags)
        self.recorder.observe(self.latency, where, (time.perf_counter() - started) * 1000)


class ModelMetrics:
    """Per model version: answers by role (serving or canary) and status, latency, the
    canary's configured share and its rollbacks, drift and shadow agreement."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.ready = False
        self.rolled_back_at: dict[tuple[str, str], float] = {}
        """(model, version) -> when this replica rolled that canary back (unix time)."""

    def _setup(self) -> None:
        from ray.util import metrics

        self.answers = metrics.Counter(
            "rayline_model_requests",
            description="answers of a model route, by the version that gave them",
            tag_keys=("model", "version", "role", "status"),
        )
        self.latency = metrics.Histogram(
            "rayline_model_latency_ms",
            description="time from request to response, by the version that answered",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("model", "version", "role"),
        )
        self.fraction = metrics.Gauge(
            "rayline_canary_fraction",
            description="share of a model's requests its live canary takes (0: none, or rolled back)",
            tag_keys=("model",),
        )
        self.rollbacks = metrics.Counter(
            "rayline_canary_rollbacks",
            description="canary versions rolled back by this replica",
            tag_keys=("model", "version"),
        )
        # A time, not only a counter: an alert on a counter's first increase cannot tell
        # it from a Prometheus that started since (deploy/prometheus/rayline-alerts.yml).
        self.rollback_time = metrics.Gauge(
            "rayline_canary_rolled_back_time_seconds",
            description="unix time this replica last rolled the version back",
            tag_keys=("model", "version"),
        )
        self.feature_psi = metrics.Gauge(
            "rayline_drift_psi",
            description="PSI of a feature served lately against the version's reference",
            tag_keys=("model", "version", "feature"),
        )
        self.outputs_psi = metrics.Gauge(
            "rayline_drift_outputs_psi",
            description="PSI of the answers given lately against the version's reference",
            tag_keys=("model", "version"),
        )
        self.max_psi = metrics.Gauge(
            "rayline_drift_max_psi",
            description="the largest PSI of a model version's features and outputs",
            tag_keys=("model", "version"),
        )
        self.agreement = metrics.Histogram(
            "rayline_shadow_agreement",
            description="per shadowed request: how alike the shadow's answer was to the "
            "serving one (agreement in [0, 1], or mean_abs_difference)",
            boundaries=[0.01, 0.05, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999],
            tag_keys=("model", "version", "measure"),
        )
        self.ready = True

    def shadowed(self, model: str, version: int, measures: dict[str, float]) -> None:
        if not self.ready:
            self._setup()
        for measure, value in measures.items():
            tags = (("model", model), ("version", str(version)), ("measure", measure))
            self.recorder.observe(self.agreement, tags, value)

    def answered(self, model: str, version: int, role: str, status: int, latency_s: float):
        if not self.ready:
            self._setup()
        tags = (("model", model), ("version", str(version)), ("role", role))
        self.recorder.inc(self.answers, (*tags, ("status", str(status))))
        self.recorder.observe(self.latency, tags, latency_s * 1000)

    def canary(self, model: str, fraction: float) -> None:
        if not self.ready:
            self._setup()
        self.fraction.set(fraction, {"model": model})

    def drift(self, model: str, version: int, report: dict) -> None:
        if not self.ready:
            self._setup()
        if report["insufficient_data"]:  # a PSI over a handful of rows is noise
            return
        tags = {"model": model, "version": str(version)}
        for feature, value in report["features"].items():
            self.feature_psi.set(value, {**tags, "feature": feature})
        self.outputs_psi.set(report["outputs_psi"], tags)
        self.max_psi.set(report["max_psi"], tags)

    def rolled_back(self, model: str, version: int) -> None:
        if not self.ready:
            self._setup()
        self.rollbacks.inc(1, {"model": model, "version": str(version)})
        self.rolled_back_at[model, str(version)] = time.time()
        self.publish_rollback_times()

    def publish_rollback_times(self) -> None:
        """Set again every few seconds with the other gauges: Ray stops exporting a gauge
        nobody sets for a while."""
        if not self.ready:
            self._setup()
        for (model, version), unix_s in self.rolled_back_at.items():
            self.rollback_time.set(unix_s, {"model": model, "version": version})


LOOP_PROBE_S = 0.1
"""How often a replica's event loop is asked to wake, to time how late it does."""


class LoopLag:
    """How late this replica's event loop runs what is due: every LOOP_PROBE_S a probe
    asks to be woken and records by how much the wake came late. The loop answers every
    request of the replica, so while it stalls (a blocking call on it, its thread
    starved of CPU, the GIL held elsewhere) every route's latency rises at once; this
    histogram says so per replica, where per-route latency cannot tell whose the delay
    is. (It took a probe like this to find the 100-120 ms stalls behind the hostile
    mix's p99, docs/benchmarks.md.)"""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    async def run(self, probe_s: float = LOOP_PROBE_S) -> None:
        from ray.util import metrics

        lag = metrics.Histogram(
            "rayline_event_loop_lag_ms",
            description="how late a replica's event loop woke for a timer due then: while "
            "it is late, every request of the replica waits",
            boundaries=LATENCY_MS_BUCKETS,
            tag_keys=("deployment", "replica"),
        )
        tags = replica_tags()
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(probe_s)
            late_ms = (loop.time() - asked - probe_s) * 1000
            self.recorder.observe(lag, tags, max(late_ms, 0.0))


def replica_tags() -> Tags:
    """This Serve replica's deployment and id; the pid outside Serve (a test's process)."""
    from ray import serve

    try:
        context = serve.get_replica_context()
        return (("deployment", context.deployment), ("replica", context.replica_tag))
    except Exception:  # RayServeException outside a replica
        return (("deployment", ""), ("replica", f"pid-{os.getpid()}"))
