"""The gateway's guard and metrics: the API key, the request body limit counted as the
body arrives, a 422 that names each field without echoing the input, requests, errors
and latency per route template and per model version through Ray's metrics
(Prometheus), and the `X-Rayline-Model` header naming the version that answered."""

# No `from __future__ import annotations`: FastAPI reads the handler's types.
import contextlib
import contextvars
import hashlib
import hmac
import json
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from rayline.serving.canary import CANARY_HEADER
from rayline.serving.http import json_response

CANARY_HEADER_BYTES = CANARY_HEADER.encode()


class RouteMetrics:
    """Requests, errors (status >= 400) and latency per route template and method, through
    Ray's metrics, which the cluster exports to Prometheus."""

    def __init__(self):
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
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("route", "method"),
        )
        self.ready = True

    def record(self, scope: dict, status: int, started: float) -> None:
        if not self.ready:
            self._setup()
        matched = scope.get("route")
        route = getattr(matched, "path", "unmatched")  # the template: no ids in the label
        method = scope.get("method", "")
        tags = {"route": route, "method": method, "status": str(status)}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, tags)
        self.latency.observe(
            (time.perf_counter() - started) * 1000, {"route": route, "method": method}
        )


class ModelMetrics:
    """Per model version: answers by role (serving or canary) and status, latency, the
    canary's configured share and its rollbacks; the names deploy/grafana/rayline.json
    charts."""

    def __init__(self):
        self.ready = False

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
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
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
            self.agreement.observe(
                value, {"model": model, "version": str(version), "measure": measure}
            )

    def answered(self, model: str, version: int, role: str, status: int, latency_s: float):
        if not self.ready:
            self._setup()
        tags = {"model": model, "version": str(version), "role": role}
        self.answers.inc(1, {**tags, "status": str(status)})
        self.latency.observe(latency_s * 1000, tags)

    def canary(self, model: str, fraction: float) -> None:
        if not self.ready:
            self._setup()
        self.fraction.set(fraction, {"model": model})

    def drift(self, model: str, version: int, report: dict) -> None:
        if not self.ready:
            self._setup()
        if not report["window"]:
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


ANSWERED: contextvars.ContextVar[list | None] = contextvars.ContextVar("answered", default=None)
"""Per request, set by the guard: the (model, role, version) the route answered with,
appended by the gateway when a route picks its model (a mutable list, so that it is seen
here whatever task the route ran in)."""


def answered_by(model: str, role: str, version: int) -> None:
    slot = ANSWERED.get()
    if slot is not None:
        slot.append((model, role, version))


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware around the app: the API key (when configured; never for
    /healthz), the body limit counted as the body arrives, chunked or not (a
    Content-Length header alone proves nothing), per-route metrics, and for a model
    route the version that answered: the header, and `on_answer((model, role, version),
    status, latency_s)` once the answer is sent."""

    def __init__(
        self,
        app,
        max_body_bytes: int,
        api_key_sha256: str | None,
        metrics: RouteMetrics,
        on_answer: Callable[[tuple, int, float], None] | None = None,
        prediction_log=None,
    ):
        self.app, self.limit, self.key_hash, self.metrics = (
            app,
            max_body_bytes,
            api_key_sha256,
            metrics,
        )
        self.on_answer, self.prediction_log = on_answer, prediction_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        limit, key_hash = self.limit, self.key_hash
        route = scope["path"][len(scope.get("root_path", "")) :]
        headers = dict(scope.get("headers") or [])
        status_code = 500

        async def answer(code: int, detail: str) -> None:
            nonlocal status_code
            status_code = code
            body = json.dumps({"detail": detail}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        if key_hash and route != "/healthz":
            given = hashlib.sha256(headers.get(b"x-api-key", b"")).hexdigest()
            if not hmac.compare_digest(given, key_hash):
                await answer(401, "missing or wrong X-API-Key header")
                self.metrics.record(scope, 401, started)
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await answer(413, f"request body over {limit} bytes")
            self.metrics.record(scope, 413, started)
            return
        received, too_large, replaced = 0, False, False
        answered: list = []
        ANSWERED.set(answered)
        log = self.prediction_log
        sampled = log is not None and log.sampled()
        request_body: list[bytes] = []
        response_body: list[bytes] = []

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if sampled:
                    request_body.append(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def checked_send(message):
            nonlocal replaced, status_code
            if too_large:  # whatever the app made of the cut body, the answer is 413
                if not replaced:
                    replaced = True
                    await answer(413, f"request body over {limit} bytes")
                return
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if answered:
                    model, _, version = answered[-1]
                    header = (CANARY_HEADER_BYTES, f"{model}/{version}".encode())
                    message = {**message, "headers": [*message.get("headers", []), header]}
            elif sampled and message["type"] == "http.response.body":
                response_body.append(message.get("body", b""))
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, checked_send)
        if too_large and not replaced:
            await answer(413, f"request body over {limit} bytes")
        self.metrics.record(scope, status_code, started)
        if answered and self.on_answer is not None:
            self.on_answer(answered[-1], status_code, time.perf_counter() - started)
        if answered and sampled:
            model, role, version = answered[-1]
            log.add(
                model,
                version,
                role,
                scope,
                status_code,
                time.perf_counter() - started,
                b"".join(request_body),
                b"".join(response_body),
            )


async def schema_error(request: Request, exc: RequestValidationError) -> Response:
    """422 naming each field and what was wrong, without echoing the input (which may
    hold NaN, unencodable in JSON, or megabytes)."""
    detail = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    return json_response({"detail": detail}, status_code=422)
