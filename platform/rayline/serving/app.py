"""One Ray Serve application for every registered model: a FastAPI ingress deployment
that holds each promoted model through the plain predictors of rayline.serving.predictors.

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
hot-reload without dropping requests, and follows the alias as it moves.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models
# themselves, not strings, once Serve rebuilds the routes inside the replica.
import asyncio
import hmac
import json
import os
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from rayline import __version__
from rayline.serving.predictors import (
    BadInput,
    BoostedService,
    DQNPolicy,
    ImageClassifierService,
    NotFound,
    RecommenderService,
    SegmenterService,
    describe,
)
from rayline.store import ModelRegistry

API_KEY_ENV = "RAYLINE_API_KEY"
MAX_BODY_BYTES = 1 << 20
"""Default request body limit; build_app's `max_body_bytes` sets it per application."""
MAX_K = 1000


class ActRequest(BaseModel):
    observations: list[Any] = Field(description="one observation, or a batch of them")


class ActResponse(BaseModel):
    model: str
    version: int
    actions: list[int]
    q_values: list[list[float]]


class RatingsRequest(BaseModel):
    ratings: dict[str, float] = Field(description="item id -> rating, for a user not in training")
    k: int = Field(10, ge=1, le=MAX_K)


class PredictRequest(BaseModel):
    rows: list[dict[str, Any]] = Field(
        description="rows of named features; every feature named, null for a missing value"
    )


class PredictResponse(BaseModel):
    model: str
    version: int
    task: str
    predictions: list[float]
    probabilities: list[Any] | None = None


class ClassifyRequest(BaseModel):
    images: list[str] = Field(description="image files (PNG, JPEG, ...), each base64-encoded")
    k: int = Field(3, ge=1, le=MAX_K, description="classes to return per image")


class ClassProbability(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[list[ClassProbability]]


class SegmentRequest(BaseModel):
    images: list[str] = Field(description="image files (PNG, JPEG, ...), each base64-encoded")


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


LOADERS = {
    "dqn": DQNPolicy,
    "recommender": RecommenderService,
    "xgboost": BoostedService,
    "image_classifier": ImageClassifierService,
    "segmenter": SegmenterService,
}
"""Registry kind -> the predictor that serves it."""


def json_response(content: dict) -> Response:
    """Encoded once with the json module: FastAPI's default path walks the answer with
    jsonable_encoder first, which costs more than the prediction for the larger answers."""
    return Response(json.dumps(content).encode(), media_type="application/json")


class Following:
    """The loaded version of one model alias, reloaded when the alias moves: checked at
    most every `poll_s` seconds on the request path; the swap is one assignment, so no
    request sees a half-loaded model."""

    def __init__(self, registry: ModelRegistry, name: str, kind: str, ref: str, poll_s: float):
        self.registry, self.name, self.ref, self.poll_s = registry, name, ref, poll_s
        self.loader = LOADERS[kind]
        self.current = self.loader(registry, name, ref)
        self.checked_at = time.monotonic()

    def get(self):
        if time.monotonic() - self.checked_at >= self.poll_s:
            self.checked_at = time.monotonic()
            if self.registry.resolve(self.name, self.ref) != self.current.version.version:
                self.current = self.loader(self.registry, self.name, self.ref)
        return self.current


api = FastAPI(
    title="rayline",
    version=__version__,
    description="Every registered rayline model over HTTP/JSON.",
)


@api.middleware("http")
async def guard(request: Request, call_next):
    """API key (when RAYLINE_API_KEY is set; never for /healthz), a body size limit, and
    per-route request, error and latency metrics."""
    started = time.perf_counter()
    expected = os.environ.get(API_KEY_ENV)
    route = request.url.path[len(request.scope.get("root_path", "")) :]  # without the app's prefix
    if expected and route != "/healthz":
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            response = JSONResponse(
                {"detail": "missing or wrong X-API-Key header"}, status_code=401
            )
            METRICS.record(request, response.status_code, started)
            return response
    length = request.headers.get("content-length")
    limit = getattr(request.app.state, "max_body_bytes", MAX_BODY_BYTES)
    if length is not None and (not length.isdigit() or int(length) > limit):
        response = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
    else:
        response = await call_next(request)
    METRICS.record(request, response.status_code, started)
    return response


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

    def record(self, request: Request, status: int, started: float) -> None:
        if not self.ready:
            self._setup()
        matched = request.scope.get("route")
        route = getattr(matched, "path", "unmatched")  # the template: no ids in the label
        tags = {"route": route, "method": request.method, "status": str(status)}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, tags)
        self.latency.observe(
            (time.perf_counter() - started) * 1000, {"route": route, "method": request.method}
        )


METRICS = RouteMetrics()


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
    ):
        api.state.max_body_bytes = max_body_bytes
        self.registry = ModelRegistry(store_uri, create=False)
        self.kinds, self.batching, self.request_timeout_s = kinds, batching, request_timeout_s
        recommenders = sorted(n for n, k in kinds.items() if k == "recommender")
        self.default_recommender = recommenders[0] if recommenders else None

    def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        poll_s = float(user_config.get("poll_s", 10.0))
        self.models = {
            name: Following(self.registry, name, kind, ref, poll_s)
            for name, kind in self.kinds.items()
        }

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
        if name is None or self.kinds.get(name) != kind:
            known = ", ".join(sorted(n for n, k in self.kinds.items() if k == kind))
            raise HTTPException(
                status_code=404, detail=f"no {what} {name!r} (known: {known or 'none deployed'})"
            )
        return self.models[name].get()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/models")
    async def models_info(self) -> dict:
        return json_response({"models": [describe(f.get().version) for f in self.models.values()]})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
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

    @api.post("/dqn/{model}/act", response_model=ActResponse)
    async def act(self, model: str, body: ActRequest) -> dict:
        policy = self._model(model, "dqn", "DQN policy")
        try:
            observations = policy.check(body.observations)
        except BadInput as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if not self.batching:
            answer = await self._run(policy.act, observations)
            return json_response({"model": model, "version": policy.version.version, **answer})
        answer = await self._answer(self._act_batch((policy, observations)))
        return json_response({"model": model, **answer})

    @api.post("/xgboost/{model}/predict", response_model=PredictResponse)
    async def predict(self, model: str, body: PredictRequest) -> dict:
        service = self._model(model, "xgboost", "XGBoost model")
        answer = await self._run(service.predict, body.rows)
        return json_response({"model": model, "version": service.version.version, **answer})

    @api.post("/vision/{model}/classify", response_model=ClassifyResponse)
    async def classify(self, model: str, body: ClassifyRequest) -> dict:
        service = self._model(model, "image_classifier", "image classifier")
        answer = await self._run(service.predict, body.images, body.k)
        return json_response({"model": model, "version": service.version.version, **answer})

    @api.post("/vision/{model}/segment", response_model=SegmentResponse)
    async def segment(self, model: str, body: SegmentRequest) -> dict:
        service = self._model(model, "segmenter", "segmentation model")
        answer = await self._run(service.predict, body.images)
        return json_response({"model": model, "version": service.version.version, **answer})

    @api.get("/recommend/{user_id}")
    async def recommend(
        self, user_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        service = self._model(model or self.default_recommender, "recommender", "recommender")
        if not self.batching:
            return json_response(await self._run(service.recommend, user_id, k))
        encoded = await self._answer(self._recommend_batch((service, user_id, k)))
        return Response(encoded, media_type="application/json")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def _recommend_batch(self, calls: list) -> list:
        """Concurrent top-k requests answered and encoded in one worker-thread hop."""

        def answer_all() -> list:
            return [json.dumps(service.recommend(user, k)).encode() for service, user, k in calls]

        return await asyncio.to_thread(answer_all)

    @api.post("/recommend")
    async def recommend_new(self, body: RatingsRequest, model: str | None = None) -> dict:
        service = self._model(model or self.default_recommender, "recommender", "recommender")
        return json_response(await self._run(service.recommend_new, body.ratings, body.k))

    @api.get("/items/{item_id}/similar")
    async def similar(
        self, item_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        service = self._model(model or self.default_recommender, "recommender", "recommender")
        return json_response(await self._run(service.similar, item_id, k))


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve 2.60's direct ingress (../shared/docs/serve-fastpath.md): the gateway replica
    answers HTTP itself on `port` (bound to http_options.host), skipping Serve's Python
    proxy, which measured about 0.1x a plain FastAPI app here. Serve reads these when it
    is imported, so they must be in the environment of the driver (before `import ray`)
    and of every replica (the cluster's runtime env)."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy` (import path
    rayline.serving.app:build_app) and `rayline serve`: every model in the store that has
    the alias (default `production`), or the listed `models`.

    args: store_uri (default $RAYLINE_STORE or ./artifacts), alias, models (names),
    poll_s (seconds between checks of where the alias points), batching (answer
    concurrent DQN requests in one forward pass; default true), request_timeout_s (past it a
    request gets 504; default 30), max_body_bytes (larger bodies get 413; default 1 MiB).
    When $RAYLINE_API_KEY is
    set where the app is built, every route but /healthz requires it as X-API-Key."""
    store_uri = args.get("store_uri") or os.environ.get("RAYLINE_STORE", "./artifacts")
    if "://" not in store_uri:
        store_uri = os.path.abspath(store_uri)  # replicas run in other working directories
    alias = args.get("alias", "production")
    registry = ModelRegistry(store_uri, create=False)
    names = args.get("models") or [n for n in registry.names() if alias in registry.aliases(n)]
    kinds = {}
    for name in names:
        kind = registry.get(name, alias).kind
        if kind in LOADERS:
            kinds[name] = kind
    options: dict = {"num_cpus": 0}
    if os.environ.get(API_KEY_ENV):  # to the gateway's process only, never in the app's args
        options["runtime_env"] = {"env_vars": {API_KEY_ENV: os.environ[API_KEY_ENV]}}
    user_config = {"ref": alias, "poll_s": float(args.get("poll_s", 10.0))}
    return Gateway.options(ray_actor_options=options, user_config=user_config).bind(
        store_uri,
        kinds,
        bool(args.get("batching", True)),
        float(args.get("request_timeout_s", 30.0)),
        int(args.get("max_body_bytes", MAX_BODY_BYTES)),
    )
