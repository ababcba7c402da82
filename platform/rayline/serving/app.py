"""One Ray Serve application for every registered model: a FastAPI ingress deployment
that holds each promoted model through the plain predictor its family declares (each
family's PIPELINE lists the kinds it serves; rayline.pipelines.served_kinds asks them).

    POST /dqn/{model}/act            observation(s) -> greedy action(s) and Q-values
    POST /xgboost/{model}/predict    rows of named features -> predictions
    POST /vision/{model}/classify    base64 image files -> top-k classes
    POST /vision/{model}/segment     base64 image files -> a class for every pixel
    GET  /recommend/{user_id}?k=10   top-k for a known user (cold-start answer otherwise)
    POST /recommend                  a new user's ratings -> top-k, without retraining
    GET  /items/{item_id}/similar    items like this one
    GET  /models, GET /healthz

The models live in the ingress replica itself: a request never crosses to another
process, which measured several times faster than a gateway calling one deployment per
model. Scale with the deployment's replicas (each holds every model). The replica loads
the models in reconfigure (user_config {"ref": alias, "poll_s": s}), Serve's way to
hot-reload without dropping requests, and follows the alias as it moves: a background
task per model checks the alias and loads a new version in a worker thread, so no
request waits for a load. A version that cannot be loaded (a file that fails its hash
check, a corrupt file) is refused once, logged once, and listed by /models; the version
before it keeps answering.

Every input gets a 2xx or a 4xx: the request schemas are strict (numbers are JSON
numbers within float32's range, lists are not empty), the body limit is enforced while
the body is read (chunked or not), and every error status is in the OpenAPI document.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models
# themselves, not strings, once Serve rebuilds the routes inside the replica.
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from ray import serve

from rayline import __version__
from rayline.config import ConfigError, bounded, from_dict
from rayline.numbers import FLOAT32_MAX
from rayline.pipelines import served_kinds
from rayline.serving.base import BadInput, NotFound, describe
from rayline.serving.front import Front
from rayline.store import ModelRegistry, RegistryError

APP_NAME = "rayline"
"""The application's name: `rayline serve`, deploy/serve.yaml and the front agree on it."""
API_KEY_ENV = "RAYLINE_API_KEY"
API_KEY_FILE_ENV = "RAYLINE_API_KEY_FILE"
MAX_BODY_BYTES = 1 << 20
"""Default request body limit; build_app's `max_body_bytes` sets it per application."""
MAX_K = 1000
logger = logging.getLogger("ray.serve")

Float32 = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""A JSON number that is a finite float32: no strings, no booleans, no 1e300."""


class ErrorBody(BaseModel):
    detail: Any = Field(description="what was wrong: a message, or the fields that were")


ERRORS = {
    400: {"model": ErrorBody, "description": "the input cannot be used (the message says why)"},
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key header"},
    404: {"model": ErrorBody, "description": "no such model, user or item"},
    413: {"model": ErrorBody, "description": "the request body is over the limit"},
    422: {"model": ErrorBody, "description": "the body does not match the request schema"},
    504: {"model": ErrorBody, "description": "no answer within the request timeout"},
}
"""Every error a route can answer, for the OpenAPI document."""


class ActRequest(BaseModel):
    observations: list[Any] = Field(
        min_length=1,
        description="one observation, or a batch of them: JSON numbers within float32's range",
    )


class ActResponse(BaseModel):
    model: str
    version: int
    actions: list[int]
    q_values: list[list[float]]


class RatingsRequest(BaseModel):
    ratings: dict[str, Float32] = Field(
        min_length=1, description="item id -> rating, for a user not in training"
    )
    k: int = Field(10, ge=1, le=MAX_K)


class PredictRequest(BaseModel):
    rows: list[dict[str, Any]] = Field(
        min_length=1,
        description="rows of named features; every feature named, null for a missing value; "
        "numbers within float32's range",
    )


class PredictResponse(BaseModel):
    model: str
    version: int
    task: str
    predictions: list[float]
    probabilities: list[Any] | None = None


class ClassifyRequest(BaseModel):
    images: list[str] = Field(
        min_length=1, description="image files (PNG, JPEG, ...), each base64-encoded"
    )
    k: int = Field(3, ge=1, le=MAX_K, description="classes to return per image")


class ClassProbability(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[list[ClassProbability]]


class SegmentRequest(BaseModel):
    images: list[str] = Field(
        min_length=1, description="image files (PNG, JPEG, ...), each base64-encoded"
    )


class SegmentedImage(BaseModel):
    width: int
    height: int
    mask_png: str = Field(description="base64 PNG; each pixel is a class index into `classes`")
    pixels: dict[str, float] = Field(description="class -> share of the image's pixels")


class SegmentResponse(BaseModel):
    model: str
    version: int
    classes: list[str]
    predictions: list[SegmentedImage]


def json_response(content: dict, status_code: int = 200) -> Response:
    """Encoded once with the json module: FastAPI's default path walks the answer with
    jsonable_encoder first, which costs more than the prediction for the larger answers."""
    return Response(
        json.dumps(content).encode(), status_code=status_code, media_type="application/json"
    )


class Following:
    """The loaded version of one model alias. `follow` (a background task of the replica)
    checks every `poll_s` seconds where the alias points and loads a new version in a
    worker thread; the swap is one assignment, so no request waits for a load or sees a
    half-loaded model. A version that cannot be loaded is refused once, logged once with
    its reason, and the version before it keeps answering."""

    def __init__(self, registry: ModelRegistry, name: str, kind: str, ref: str, poll_s: float):
        self.registry, self.name, self.ref, self.poll_s = registry, name, ref, poll_s
        self.loader = served_kinds()[kind].load
        self.current = None
        self.refused: dict[int, str] = {}
        """Version -> why it is not served."""

    def load(self) -> None:
        """Load the version the alias points at now (at start, in a worker thread)."""
        try:
            version = self.registry.resolve(self.name, self.ref)
        except RegistryError as exc:
            self._refuse(-1, str(exc))
            return
        self._load(version)

    def _load(self, version: int) -> None:
        try:
            self.current = self.loader(self.registry, self.name, version)
        except Exception as exc:  # a bad artifact must never take the replica down
            self._refuse(version, f"{type(exc).__name__}: {exc}")

    def _refuse(self, version: int, reason: str) -> None:
        if version not in self.refused:
            self.refused[version] = reason
            logger.warning("rayline: not serving %s v%s: %s", self.name, version, reason)

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                version = await asyncio.to_thread(self.registry.resolve, self.name, self.ref)
            except RegistryError as exc:
                self._refuse(-1, str(exc))
                continue
            serving = self.current.version.version if self.current else None
            if version != serving and version not in self.refused:
                await asyncio.to_thread(self._load, version)

    def problems(self) -> list[dict]:
        return [
            {"name": self.name, "version": version if version > 0 else None, "reason": reason}
            for version, reason in self.refused.items()
        ]


class Batcher:
    """Concurrent calls share one `compute(items) -> answers` (an answer may be an
    exception, raised to its caller alone). A call that finds nothing queued is computed
    at once; calls that arrive while a computation runs wait for it and go together in
    the next: batches cost no latency at low load."""

    def __init__(self, compute: Callable[[list], Awaitable[list]], max_batch: int):
        self.compute, self.max_batch = compute, max_batch
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.running = False

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
                try:
                    answers = await self.compute([item for item, _ in batch])
                except Exception as exc:
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if future.done():  # its caller timed out
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self.running = False


api = FastAPI(
    title="rayline",
    version=__version__,
    description="Every registered rayline model over HTTP/JSON.",
)


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware around the app: the API key (when configured; never for
    /healthz), the body limit counted as the body arrives, chunked or not (a
    Content-Length header alone proves nothing), and per-route metrics."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        # The app's own state (scope["app"]): Serve runs a frozen copy of `api`.
        state = scope["app"].state
        limit = getattr(state, "max_body_bytes", MAX_BODY_BYTES)
        key_hash = getattr(state, "api_key_sha256", None)
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
                METRICS.record(scope, 401, started)
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await answer(413, f"request body over {limit} bytes")
            METRICS.record(scope, 413, started)
            return
        received, too_large, replaced = 0, False, False

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, checked_send)
        if too_large and not replaced:
            await answer(413, f"request body over {limit} bytes")
        METRICS.record(scope, status_code, started)


@api.exception_handler(RequestValidationError)
async def schema_error(request: Request, exc: RequestValidationError) -> Response:
    """422 naming each field and what was wrong, without echoing the input (which may
    hold NaN, unencodable in JSON, or megabytes)."""
    detail = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    return json_response({"detail": detail}, status_code=422)


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


METRICS = RouteMetrics()
api.add_middleware(Guard)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=128)
@serve.ingress(api)
class Gateway:
    """Every model, loaded in this replica by alias (no hop to another process per
    request); `reconfigure` ({"ref", "poll_s"}) moves them all to another alias without
    dropping requests. With `batching`, concurrent DQN requests share one forward pass and
    concurrent top-k requests one worker-thread hop."""

    def __init__(
        self,
        store_uri: str,
        kinds: dict[str, str],
        batching: bool = True,
        request_timeout_s: float = 30.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        refused: dict[str, str] | None = None,
        api_key_sha256: str | None = None,
        front=None,
        own_deployments: dict | None = None,
    ):
        del front  # bound only so that Serve deploys it with the application
        api.state.max_body_bytes = max_body_bytes
        api.state.api_key_sha256 = api_key_sha256
        # Serving only reads: no folders made, no probe written, read-only credentials do.
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.kinds, self.batching, self.request_timeout_s = kinds, batching, request_timeout_s
        self.refused_at_build = [
            {"name": name, "version": None, "reason": reason}
            for name, reason in (refused or {}).items()
        ]
        recommenders = sorted(n for n, k in kinds.items() if k == "recommender")
        self.default_recommender = recommenders[0] if recommenders else None
        self.models: dict[str, Following] = {}
        self.remote: dict = own_deployments or {}
        """Model name -> handle of the ModelServer deployment that holds it."""
        self.followers: list[asyncio.Task] = []
        self.act_batcher = Batcher(self._act_batch, max_batch=32)
        self.recommend_batcher = Batcher(self._recommend_batch, max_batch=16)

    async def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        poll_s = float(user_config.get("poll_s", 10.0))
        models = {
            name: Following(self.registry, name, kind, ref, poll_s)
            for name, kind in self.kinds.items()
            if name not in self.remote
        }
        await asyncio.gather(*(asyncio.to_thread(m.load) for m in models.values()))
        for task in self.followers:
            task.cancel()
        self.models = models
        loop = asyncio.get_running_loop()
        self.followers = [loop.create_task(m.follow()) for m in models.values()]

    async def _run(self, function, *args):
        """Prediction code in a worker thread: past the timeout the client gets 504 while
        the replica keeps answering others (the thread finishes in the background)."""
        return await self._answer(asyncio.to_thread(function, *args))

    async def _answer(self, awaitable):
        """The awaited answer, or the 4xx/504 that says why there is none."""
        try:
            return await asyncio.wait_for(awaitable, self.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(
                status_code=504, detail=f"no answer within {self.request_timeout_s:g}s"
            ) from None
        except BadInput as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def _model(self, name: str | None, kind: str, what: str):
        following = self.models.get(name) if self.kinds.get(name) == kind else None
        if following is None or following.current is None:
            known = ", ".join(
                sorted(
                    n
                    for n, k in self.kinds.items()
                    if k == kind and (n in self.remote or self.models[n].current)
                )
            )
            why = (
                f"; {name!r} is not served: {following.problems()[-1]['reason']}"
                if following
                else ""
            )
            raise HTTPException(
                status_code=404,
                detail=f"no {what} {name!r} (known: {known or 'none deployed'}){why}",
            )
        return following.current

    def _remote(self, name: str | None, kind: str):
        """The handle of the deployment holding `name`, if it is one of `kind` held apart."""
        return self.remote.get(name) if self.kinds.get(name) == kind else None

    async def _call(self, name: str | None, kind: str, what: str, method: str, *args):
        """(version, answer) of `method` of the model `name`, in this replica (in a worker
        thread) or in the deployment that holds it."""
        handle = self._remote(name, kind)
        if handle is not None:
            return await self._answer(handle.call.remote(method, *args))
        service = self._model(name, kind, what)
        return service.version.version, await self._run(getattr(service, method), *args)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/models", responses={401: ERRORS[401]})
    async def models_info(self) -> dict:
        served = [describe(f.current.version) for f in self.models.values() if f.current]
        refused = self.refused_at_build + [p for f in self.models.values() for p in f.problems()]
        for handle in self.remote.values():
            held, problems = await handle.status.remote()
            served += [held] if held else []
            refused += problems
        return json_response({"models": served, "refused": refused})

    async def _act_batch(self, requests: list) -> list:
        import numpy as np

        # One forward pass per (policy, version) in the batch.
        groups: dict = {}
        for i, (policy, _) in enumerate(requests):
            groups.setdefault(id(policy), (policy, []))[1].append(i)
        answers: list = [None] * len(requests)
        for policy, members in groups.values():
            batch = np.concatenate([requests[i][1] for i in members])
            result = await asyncio.to_thread(policy.act, batch)
            start = 0
            for i in members:
                size = len(requests[i][1])
                answers[i] = {
                    "version": policy.version.version,
                    "actions": result["actions"][start : start + size],
                    "q_values": result["q_values"][start : start + size],
                }
                start += size
        return answers

    @api.post("/dqn/{model}/act", response_model=ActResponse, responses=ERRORS)
    async def act(self, model: str, body: ActRequest) -> dict:
        if self._remote(model, "dqn"):
            version, answer = await self._call(model, "dqn", "DQN policy", "act", body.observations)
            return json_response({"model": model, "version": version, **answer})
        policy = self._model(model, "dqn", "DQN policy")
        try:
            observations = policy.check(body.observations)
        except BadInput as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if not self.batching:
            answer = await self._run(policy.act, observations)
            return json_response({"model": model, "version": policy.version.version, **answer})
        answer = await self._answer(self.act_batcher.submit((policy, observations)))
        return json_response({"model": model, **answer})

    @api.post("/xgboost/{model}/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(self, model: str, body: PredictRequest) -> dict:
        version, answer = await self._call(model, "xgboost", "XGBoost model", "predict", body.rows)
        return json_response({"model": model, "version": version, **answer})

    @api.post("/vision/{model}/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(self, model: str, body: ClassifyRequest) -> dict:
        version, answer = await self._call(
            model, "image_classifier", "image classifier", "predict", body.images, body.k
        )
        return json_response({"model": model, "version": version, **answer})

    @api.post("/vision/{model}/segment", response_model=SegmentResponse, responses=ERRORS)
    async def segment(self, model: str, body: SegmentRequest) -> dict:
        version, answer = await self._call(
            model, "segmenter", "segmentation model", "predict", body.images
        )
        return json_response({"model": model, "version": version, **answer})

    @api.get("/recommend/{user_id}", responses=ERRORS)
    async def recommend(
        self, user_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        name = model or self.default_recommender
        if not self.batching or self._remote(name, "recommender"):
            _, answer = await self._call(
                name, "recommender", "recommender", "recommend", user_id, k
            )
            return json_response(answer)
        service = self._model(name, "recommender", "recommender")
        encoded = await self._answer(self.recommend_batcher.submit((service, user_id, k)))
        return Response(encoded, media_type="application/json")

    async def _recommend_batch(self, calls: list) -> list:
        """Concurrent top-k requests answered and encoded in one worker-thread hop, each
        model's users scored together."""

        def answer_all() -> list:
            answers: list = [None] * len(calls)
            by_service: dict[int, list[int]] = {}
            for position, (service, _, _) in enumerate(calls):
                by_service.setdefault(id(service), []).append(position)
            for positions in by_service.values():
                service = calls[positions[0]][0]
                requests = [calls[p][1:] for p in positions]
                for position, answer in zip(positions, service.recommend_many(requests)):
                    answers[position] = json.dumps(answer).encode()
            return answers

        return await asyncio.to_thread(answer_all)

    @api.post("/recommend", responses=ERRORS)
    async def recommend_new(self, body: RatingsRequest, model: str | None = None) -> dict:
        name = model or self.default_recommender
        _, answer = await self._call(
            name, "recommender", "recommender", "recommend_new", body.ratings, body.k
        )
        return json_response(answer)

    @api.get("/items/{item_id}/similar", responses=ERRORS)
    async def similar(
        self, item_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        name = model or self.default_recommender
        _, answer = await self._call(name, "recommender", "recommender", "similar", item_id, k)
        return json_response(answer)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class ModelServer:
    """One model in a deployment of its own (`own_deployments`): its own replicas, GPUs
    and autoscaling, behind the gateway's routes, which reach it through a deployment
    handle. Like the gateway it follows the model's alias (see `Following`)."""

    def __init__(self, store_uri: str, name: str, kind: str):
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.name, self.kind = name, kind
        self.following: Following | None = None
        self.follower: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        following = Following(
            self.registry, self.name, self.kind, ref, float(user_config.get("poll_s", 10.0))
        )
        await asyncio.to_thread(following.load)
        if self.follower:
            self.follower.cancel()
        self.following = following
        self.follower = asyncio.get_running_loop().create_task(following.follow())

    async def call(self, method: str, *args) -> tuple[int, Any]:
        """(version, answer) of the held model's `method`, run in a worker thread."""
        service = self.following.current if self.following else None
        if service is None:
            problems = self.following.problems() if self.following else []
            why = f": {problems[-1]['reason']}" if problems else ""
            raise NotFound(f"model {self.name!r} is not served{why}")
        return service.version.version, await asyncio.to_thread(getattr(service, method), *args)

    def status(self) -> tuple[dict | None, list[dict]]:
        """(what /models lists for it, the versions it refused)."""
        if self.following is None:
            return None, []
        current = self.following.current
        return (describe(current.version) if current else None), self.following.problems()


OWN_DEPLOYMENT_OPTIONS = {
    "num_replicas",
    "ray_actor_options",
    "autoscaling_config",
    "max_ongoing_requests",
}
"""What `own_deployments` may set for a model's deployment (Serve's own option names)."""


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve 2.60's direct ingress (../shared/docs/serve-fastpath.md): each gateway replica
    answers HTTP itself on a port of `port + 1 .. port + 99` (bound to http_options.host),
    skipping Serve's Python proxy, which measured about 0.1x a plain FastAPI app here;
    rayline's front on `port` balances over them (rayline/serving/front.py). Serve reads
    these when it is imported, so they must be in the environment of the driver (before
    `import ray`) and of every replica (the cluster's runtime env). A dead replica's port
    is not quarantined (150 s by default), so a restarted one can take it again."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def api_key_sha256(api_key_file: str = "") -> str | None:
    """The SHA-256 of the API key, read where the app is built: from `api_key_file` (or
    the file $RAYLINE_API_KEY_FILE names), else from $RAYLINE_API_KEY. Only the hash
    reaches the replicas, never the key (runtime envs are logged in plain text). Fails
    closed: a key file named but unreadable or empty is an error, not an open app."""
    path = api_key_file or os.environ.get(API_KEY_FILE_ENV)
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"api_key_file {path}: cannot be read ({exc.strerror})") from None
        if not key:
            raise ConfigError(f"api_key_file {path}: empty")
        return hashlib.sha256(key).hexdigest()
    key = os.environ.get(API_KEY_ENV)
    if key is not None:
        if not key.strip():
            raise ConfigError(f"${API_KEY_ENV} is set but empty")
        return hashlib.sha256(key.strip().encode()).hexdigest()
    return None


@dataclasses.dataclass
class ServeArgs:
    """What the application accepts: `rayline serve`, deploy/serve.yaml's `args` and
    build_app all read this one definition (unknown keys and bad values are refused)."""

    store_uri: str = ""
    """Model store URI; empty means $RAYLINE_STORE, else ./artifacts."""
    alias: str = "production"
    """Serve each model's version that has this alias."""
    models: list[str] = dataclasses.field(default_factory=list)
    """Model names to serve; empty means every model that has the alias."""
    poll_s: float = bounded(10.0, gt=0.0)
    """Seconds between checks of where each alias points."""
    batching: bool = True
    """Answer concurrent DQN requests in one forward pass, top-k requests in one hop."""
    request_timeout_s: float = bounded(30.0, gt=0.0)
    """Past this a request gets 504 and the replica goes on."""
    max_body_bytes: int = bounded(MAX_BODY_BYTES, ge=1)
    """Larger request bodies get 413, counted as they arrive."""
    api_key_file: str = ""
    """A file holding the API key (see `api_key_sha256`); empty: $RAYLINE_API_KEY_FILE or
    $RAYLINE_API_KEY, else no key."""
    front_port: int = bounded(0, ge=0, le=65535)
    """Port of rayline's front (rayline/serving/front.py), the stable address before the
    gateway replicas' own ports (Serve's direct ingress must be on); 0: no front."""
    front_host: str = "127.0.0.1"
    """Interface the front listens on: loopback unless you mean to expose it."""
    replicas: int = bounded(1, ge=1)
    """Gateway replicas (deploy/serve.yaml's autoscaling_config overrides it)."""
    access_log: bool = False
    """Serve's line per request in the replica's log (and on `rayline serve`'s console).
    Off: it costs time on every request, and the front's health checks would fill it;
    rayline_requests counts every request by route and status either way."""
    gateway_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each gateway replica needs: places replicas on the nodes that
    have them (a serving node group)."""
    own_deployments: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Model name -> options of a deployment of its own (`ModelServer-NAME`):
    num_replicas, ray_actor_options (e.g. {num_gpus: 1}), autoscaling_config,
    max_ongoing_requests. For heavy models (vision on GPU replicas) beside the small ones
    the gateway replicas hold; the routes stay the same."""


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy` (import path
    rayline.serving.app:build_app) and `rayline serve`, from `args` as `ServeArgs`: every
    model in the store that has the alias, or the listed `models`. With a key, every
    route but /healthz requires it as X-API-Key. A model whose metadata cannot be read is
    not served and is listed under `refused` by /models; the others are served."""
    settings = from_dict(ServeArgs, args)
    store_uri = settings.store_uri or os.environ.get("RAYLINE_STORE", "./artifacts")
    if "://" not in store_uri:
        store_uri = os.path.abspath(store_uri)  # replicas run in other working directories
    alias = settings.alias
    registry = ModelRegistry(store_uri, create=False, read_only=True)
    names = settings.models or [n for n in registry.names() if alias in registry.aliases(n)]
    kinds, refused = {}, {}
    for name in names:
        try:
            kind = registry.get(name, alias).kind
        except RegistryError as exc:
            refused[name] = str(exc)
            logger.warning("rayline: not serving %s: %s", name, exc)
            continue
        if kind in served_kinds():
            kinds[name] = kind
    user_config = {"ref": alias, "poll_s": settings.poll_s}
    front = None
    if settings.front_port:
        front = Front.bind(
            settings.front_host, settings.front_port, APP_NAME, settings.request_timeout_s
        )
    own = {}
    for name, options in settings.own_deployments.items():
        unknown = set(options) - OWN_DEPLOYMENT_OPTIONS
        if unknown:
            raise ConfigError(
                f"own_deployments.{name}: unknown option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(OWN_DEPLOYMENT_OPTIONS))})"
            )
        if name not in kinds:
            raise ConfigError(
                f"own_deployments.{name}: not a served model "
                f"(served: {', '.join(sorted(kinds)) or 'none'})"
            )
        options = {"ray_actor_options": {"num_cpus": 0}, **options}
        own[name] = ModelServer.options(
            name=f"ModelServer-{name}", user_config=user_config, **options
        ).bind(store_uri, name, kinds[name])
    gateway = Gateway.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": 0, "resources": settings.gateway_resources},
        user_config=user_config,
        logging_config={"enable_access_log": settings.access_log},
    )
    return gateway.bind(
        store_uri,
        kinds,
        settings.batching,
        settings.request_timeout_s,
        settings.max_body_bytes,
        refused,
        api_key_sha256(settings.api_key_file),
        front,
        own,
    )
