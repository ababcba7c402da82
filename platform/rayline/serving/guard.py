"""The gateway's guard: the API key, the request body limit counted as the body arrives,
a 422 that names each field without echoing the input, each answer counted per route
template (rayline.serving.metrics), and the `X-Rayline-Model` header naming the version
that answered."""

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
from rayline.serving.metrics import RouteMetrics

CANARY_HEADER_BYTES = CANARY_HEADER.encode()


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
            # The Open Inference Protocol's clients read `error`; the others `detail`.
            key = "error" if route.startswith("/v2/") or route == "/v2" else "detail"
            body = json.dumps({key: detail}).encode()
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

        if key_hash and route not in ("/healthz", "/readyz"):
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
