"""The gateway's guard and what it observes: access (the API key, the request body limit
counted as the body arrives), a 422 that names each field without echoing the input,
and `Observation` of every answer: counted per route template
(rayline.serving.metrics), the `X-Rayline-Model` header naming the version that
answered, the traffic's judging and the prediction log's sample."""

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
from rayline.serving.replays import REQUEST_ID_KEY, HeldRequests, request_name

CANARY_HEADER_BYTES = CANARY_HEADER.encode()


ANSWERED: contextvars.ContextVar[list | None] = contextvars.ContextVar("answered", default=None)
"""Per request, set by the guard: the (model, role, version) the route answered with,
appended by the gateway when a route picks its model (a mutable list, so that it is seen
here whatever task the route ran in). A context variable because nothing else reaches
both: the routes are the families' code, which hands the gateway a model's name, never
the request; threading the ASGI scope through every family's call for the gateway's
bookkeeping would make each family carry it."""


def answered_by(model: str, role: str, version: int) -> None:
    slot = ANSWERED.get()
    if slot is not None:
        slot.append((model, role, version))


class BodyTooLarge(Exception):
    pass


class Seen:
    """What one request's observation keeps while it runs."""

    __slots__ = ("answered", "sampled", "request_body", "response_body")

    def __init__(self, sampled: bool):
        self.answered: list = []
        self.sampled = sampled
        self.request_body: list[bytes] = []
        self.response_body: list[bytes] = []


class Observation:
    """What the replica keeps of every answer: per-route metrics, and for a model route
    the version that answered (the `X-Rayline-Model` header), `judge((model, role,
    version), status, latency_s)` (the traffic's figures and the canary's judging) and
    the prediction log's sample."""

    def __init__(
        self,
        metrics: RouteMetrics,
        judge: Callable[[tuple, int, float], None] | None = None,
        prediction_log=None,
    ):
        self.metrics, self.judge, self.prediction_log = metrics, judge, prediction_log

    def begin(self) -> Seen:
        log = self.prediction_log
        seen = Seen(log is not None and log.sampled())
        ANSWERED.set(seen.answered)
        return seen

    @staticmethod
    def response_start(seen: Seen, message: dict) -> dict:
        if seen.answered:
            model, _, version = seen.answered[-1]
            header = (CANARY_HEADER_BYTES, f"{model}/{version}".encode())
            message = {**message, "headers": [*message.get("headers", []), header]}
        return message

    def end(self, scope, seen: Seen | None, status: int, started: float) -> None:
        self.metrics.record(scope, status, started)
        if seen is None or not seen.answered:
            return
        latency_s = time.perf_counter() - started
        if self.judge is not None:
            self.judge(seen.answered[-1], status, latency_s)
        if seen.sampled:
            model, role, version = seen.answered[-1]
            self.prediction_log.add(
                model,
                version,
                role,
                scope,
                status,
                latency_s,
                b"".join(seen.request_body),
                b"".join(seen.response_body),
            )


class Guard:
    """Pure ASGI middleware around the app: access first (the API key when configured,
    never for /healthz and /readyz; the body limit counted as the body arrives, chunked
    or not: a Content-Length header alone proves nothing), then a request that a crashed
    replica held is answered 502, not computed (`held_requests`, rayline.serving.replays),
    then `observation` of every answer, refused ones included."""

    def __init__(
        self,
        app,
        max_body_bytes: int,
        api_key_sha256: str | None,
        observation: Observation,
        held_requests: HeldRequests | None = None,
    ):
        self.app, self.limit, self.key_hash = app, max_body_bytes, api_key_sha256
        self.observation, self.held_requests = observation, held_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        limit, key_hash, observation = self.limit, self.key_hash, self.observation
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
                observation.end(scope, None, 401, started)
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await answer(413, f"request body over {limit} bytes")
            observation.end(scope, None, 413, started)
            return
        held, name = self.held_requests, None
        if held is not None and (name := request_name(headers.get(REQUEST_ID_KEY))):
            refusal = held.take(name)
            if refusal is not None:
                await answer(502, refusal)
                observation.end(scope, None, 502, started)
                return
        received, too_large, replaced = 0, False, False
        seen = observation.begin()
        sampled = seen.sampled

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if sampled:
                    seen.request_body.append(message.get("body", b""))
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
                message = observation.response_start(seen, message)
            elif sampled and message["type"] == "http.response.body":
                seen.response_body.append(message.get("body", b""))
            await send(message)

        try:
            with contextlib.suppress(BodyTooLarge):
                await self.app(scope, counted_receive, checked_send)
        finally:
            if name is not None:
                held.release(name)
        if too_large and not replaced:
            await answer(413, f"request body over {limit} bytes")
        observation.end(scope, seen, status_code, started)


async def schema_error(request: Request, exc: RequestValidationError) -> Response:
    """422 naming each field and what was wrong, without echoing the input (which may
    hold NaN, unencodable in JSON, or megabytes)."""
    detail = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    return json_response({"detail": detail}, status_code=422)
