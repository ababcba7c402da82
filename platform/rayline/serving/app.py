"""One Ray Serve application for every registered model: a FastAPI ingress in front of
one deployment per model, each a thin shell over rayline.serving.predictors.

    POST /dqn/{model}/act            observation(s) -> greedy action(s) and Q-values
    GET  /recommend/{user_id}?k=10   top-k for a known user (cold-start answer otherwise)
    POST /recommend                  a new user's ratings -> top-k, without retraining
    GET  /items/{item_id}/similar    items like this one
    GET  /models, GET /healthz

Deployments load their model by alias in __init__ and swap version in reconfigure
(user_config {"ref": ...}), Serve's way to hot-reload without dropping requests.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models
# themselves, not strings, once Serve rebuilds the routes inside the replica.
import asyncio
import hmac
import os
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from rayline import __version__
from rayline.serving.predictors import BadInput, DQNPolicy, NotFound, RecommenderService, describe
from rayline.store import ModelRegistry

API_KEY_ENV = "RAYLINE_API_KEY"
MAX_BODY_BYTES = 1 << 20
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


class Following:
    """The loaded version of one model alias (user_config `ref`), reloaded when the alias
    moves: checked at most every `poll_s` seconds on the request path; the swap is one
    assignment, so no request sees a half-loaded model."""

    def __init__(self, loader, store_uri: str, name: str, user_config: dict):
        self.loader, self.registry, self.name = loader, ModelRegistry(store_uri, create=False), name
        self.ref = user_config.get("ref", "production")
        self.poll_s = float(user_config.get("poll_s", 10.0))
        self.current = loader(self.registry, name, self.ref)
        self.checked_at = time.monotonic()

    def get(self):
        if time.monotonic() - self.checked_at >= self.poll_s:
            self.checked_at = time.monotonic()
            if self.registry.resolve(self.name, self.ref) != self.current.version.version:
                self.current = self.loader(self.registry, self.name, self.ref)
        return self.current


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class DQNDeployment:
    """One DQN policy; concurrent requests are answered in one batched forward pass
    (unless `batching` is off)."""

    def __init__(
        self,
        store_uri: str,
        name: str,
        ref: str = "production",
        poll_s: float = 10.0,
        batching: bool = True,
    ):
        self.store_uri, self.name, self.batching = store_uri, name, batching
        self.reconfigure({"ref": ref, "poll_s": poll_s})

    def reconfigure(self, user_config: dict) -> None:
        self.model = Following(DQNPolicy, self.store_uri, self.name, user_config)

    def info(self) -> dict:
        return describe(self.model.get().version)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _act_batch(self, requests: list) -> list:
        import numpy as np

        policy = self.model.get()  # one version for the whole batch
        sizes = [len(r) for r in requests]
        result = policy.act(np.concatenate(requests))
        out, start = [], 0
        for size in sizes:
            out.append(
                {
                    "model": self.name,
                    "version": policy.version.version,
                    "actions": result["actions"][start : start + size],
                    "q_values": result["q_values"][start : start + size],
                }
            )
            start += size
        return out

    async def act(self, observations: Any) -> dict:
        policy = self.model.get()
        checked = policy.check(observations)
        if self.batching:
            return await self._act_batch(checked)
        return {"model": self.name, "version": policy.version.version, **policy.act(checked)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class RecommenderDeployment:
    def __init__(self, store_uri: str, name: str, ref: str = "production", poll_s: float = 10.0):
        self.store_uri, self.name = store_uri, name
        self.reconfigure({"ref": ref, "poll_s": poll_s})

    def reconfigure(self, user_config: dict) -> None:
        self.model = Following(RecommenderService, self.store_uri, self.name, user_config)

    def info(self) -> dict:
        return describe(self.model.get().version)

    def recommend(self, user_id: str, k: int) -> dict:
        return self.model.get().recommend(user_id, k)

    def recommend_new(self, ratings: dict, k: int) -> dict:
        return self.model.get().recommend_new(ratings, k)

    def similar(self, item_id: str, k: int) -> dict:
        return self.model.get().similar(item_id, k)


api = FastAPI(
    title="rayline",
    version=__version__,
    description="Every registered rayline model over HTTP/JSON.",
)


@api.middleware("http")
async def guard(request: Request, call_next):
    """API key (when RAYLINE_API_KEY is set; never for /healthz) and a body size limit."""
    expected = os.environ.get(API_KEY_ENV)
    route = request.url.path[len(request.scope.get("root_path", "")) :]  # without the app's prefix
    if expected and route != "/healthz":
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse({"detail": "missing or wrong X-API-Key header"}, status_code=401)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return JSONResponse(
            {"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413
        )
    return await call_next(request)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=128)
@serve.ingress(api)
class Gateway:
    """Routes requests to the model deployments by name."""

    def __init__(
        self,
        dqn: dict,
        recommenders: dict,
        default_recommender: str | None,
        request_timeout_s: float = 30.0,
    ):
        self.dqn, self.recommenders = dqn, recommenders
        self.default_recommender = default_recommender
        self.request_timeout_s = request_timeout_s

    async def _call(self, handle, method: str, *args):
        response = getattr(handle, method).remote(*args)
        try:
            return await asyncio.wait_for(response, self.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()  # the model replica drops it and keeps serving the others
            raise HTTPException(
                status_code=504, detail=f"no answer within {self.request_timeout_s:g}s"
            ) from None
        except BadInput as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def _recommender(self, model: str | None):
        name = model or self.default_recommender
        if name not in self.recommenders:
            known = ", ".join(sorted(self.recommenders)) or "none deployed"
            raise HTTPException(status_code=404, detail=f"no recommender {name!r} (known: {known})")
        return self.recommenders[name]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/models")
    async def models(self) -> dict:
        handles = list(self.dqn.values()) + list(self.recommenders.values())
        return {"models": [await h.info.remote() for h in handles]}

    @api.post("/dqn/{model}/act", response_model=ActResponse)
    async def act(self, model: str, body: ActRequest) -> dict:
        if model not in self.dqn:
            known = ", ".join(sorted(self.dqn)) or "none deployed"
            raise HTTPException(status_code=404, detail=f"no DQN policy {model!r} (known: {known})")
        return await self._call(self.dqn[model], "act", body.observations)

    @api.get("/recommend/{user_id}")
    async def recommend(
        self, user_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        return await self._call(self._recommender(model), "recommend", user_id, k)

    @api.post("/recommend")
    async def recommend_new(self, body: RatingsRequest, model: str | None = None) -> dict:
        return await self._call(self._recommender(model), "recommend_new", body.ratings, body.k)

    @api.get("/items/{item_id}/similar")
    async def similar(
        self, item_id: str, k: int = Query(10, ge=1, le=MAX_K), model: str | None = None
    ) -> dict:
        return await self._call(self._recommender(model), "similar", item_id, k)


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
    request gets 504; default 30). When $RAYLINE_API_KEY is
    set where the app is built, every route but /healthz requires it as X-API-Key."""
    store_uri = args.get("store_uri") or os.environ.get("RAYLINE_STORE", "./artifacts")
    if "://" not in store_uri:
        store_uri = os.path.abspath(store_uri)  # replicas run in other working directories
    alias = args.get("alias", "production")
    poll_s = float(args.get("poll_s", 10.0))
    batching = bool(args.get("batching", True))
    registry = ModelRegistry(store_uri, create=False)
    names = args.get("models") or [n for n in registry.names() if alias in registry.aliases(n)]
    dqn, recommenders = {}, {}
    for name in names:
        kind = registry.get(name, alias).kind
        if kind == "dqn":
            dqn[name] = DQNDeployment.options(name=f"dqn-{name}").bind(
                store_uri, name, alias, poll_s, batching
            )
        elif kind == "recommender":
            recommenders[name] = RecommenderDeployment.options(name=f"recommender-{name}").bind(
                store_uri, name, alias, poll_s
            )
    gateway_options: dict = {"num_cpus": 0}
    if os.environ.get(API_KEY_ENV):  # to the gateway's process only, never in the app's args
        gateway_options["runtime_env"] = {"env_vars": {API_KEY_ENV: os.environ[API_KEY_ENV]}}
    return Gateway.options(ray_actor_options=gateway_options).bind(
        dqn,
        recommenders,
        next(iter(sorted(recommenders)), None),
        float(args.get("request_timeout_s", 30.0)),
    )
