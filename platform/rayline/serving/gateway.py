"""The gateway: a Ray Serve ingress deployment whose replicas hold every promoted model
(no hop to another process per request, which measured several times faster than one
deployment per model) and answer the routes the families declare, and `ModelServer`,
a deployment of its own for a heavy model (`own_deployments`), which the gateway
splits, shadows and watches for drift the same way as the models it holds itself.

The replica builds its FastAPI app itself (`__serve_build_asgi_app__`, after the
constructor) from the served kinds handed to it: each kind's `routes()` router, plus
/healthz and /models. It loads the models in reconfigure (user_config {"ref": alias,
"poll_s": s}), Serve's way to hot-reload without dropping requests, and follows each
alias as it moves (rayline.serving.following), and each model's canary alias where it
has a canary share or a shadow; which version answers a request, and what its answers
decide, is `Traffic`'s (rayline.serving.traffic).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from ray import serve

from rayline import __version__
from rayline.serving.base import BadInput, NotFound, ServedKind
from rayline.serving.batching import Batcher
from rayline.serving.guard import Guard, Observation, answered_by, schema_error
from rayline.serving.http import ERRORS, json_response, refused
from rayline.serving.inference_protocol import routers as protocol_routers
from rayline.serving.metrics import LoopLag, ModelMetrics, Recorder, RouteMetrics
from rayline.serving.model_server import RemoteModel, drift_report, publish_drift
from rayline.serving.prediction_log import PredictionLog
from rayline.serving.replays import held_requests
from rayline.serving.settings import SHUTDOWN_CHECK_S, ServeArgs
from rayline.serving.traffic import Held, Traffic, Versions, load_and_follow
from rayline.serving.work import Busy, WorkPools
from rayline.store import ModelRegistry

logger = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
"""How long /models waits for a deployment of its own to say what it holds."""


def core_router() -> APIRouter:
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the replica answers. (Always 200: HAProxy checks Serve's proxy, the
        front's backup, on this path too, through whichever replica the proxy picks; a
        replica still loading must not take the backup down with it.)"""
        return {"status": "ok"}

    @routes.get("/readyz", responses={503: ERRORS[503]})
    async def readyz(request: Request):
        """Readiness: 200 once this replica holds its models and can take work; 503
        with Retry-After while it loads (its port opens before the first load is done)
        or while every model's threads and queue are full (rayline.serving.work). The
        front checks it to route around a replica that cannot take work; a Kubernetes
        readiness probe can use it."""
        models = request.app.state.models
        if not models.loaded:
            return json_response({"status": "loading"}, status_code=503, retry_after_s=1)
        if models.work.saturated(models.held):
            return json_response({"status": "saturated"}, status_code=503, retry_after_s=1)
        return json_response({"status": "ready"})

    @routes.get("/models", responses={401: ERRORS[401]})
    async def models_info(request: Request):
        return json_response(await request.app.state.models.listing())

    @routes.get("/models/{name}/drift", responses={401: ERRORS[401], 404: ERRORS[404]})
    async def drift(name: str, request: Request):
        """PSI of what this replica served lately against the serving version's
        reference profile, per feature and for the outputs (rayline.drift)."""
        return json_response(await request.app.state.models.drift(name))

    return routes


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=128,
    graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S,
)
@serve.ingress()
class Gateway:
    """Every model named in `kinds` (name -> kind), loaded in this replica by alias, or
    reached through the handle of its own deployment (`own_deployments`). This object is
    the routes' `Models` (rayline.serving.http); `reconfigure` ({"ref", "poll_s"}) moves
    every model to another alias without dropping requests."""

    def __init__(
        self,
        settings: ServeArgs,
        kinds: dict[str, str],
        served: dict[str, ServedKind],
        refused: dict[str, str] | None = None,
        front=None,
        own_deployments: dict | None = None,
    ):
        """`settings` as build_app resolved them: the store's URI absolute, the API key's
        SHA-256 in `api_key_sha256` (or empty: no key)."""
        del front  # bound only so that Serve deploys it with the application
        self.settings = settings
        # Serving only reads: no folders made, no probe written, read-only credentials do.
        self.registry = ModelRegistry(settings.store_uri, create=False, read_only=True)
        self.kinds, self.served = kinds, served
        self.batching, self.request_timeout_s = settings.batching, settings.request_timeout_s
        self.refused_at_build = [
            {"name": name, "version": None, "reason": self.registry.redact(reason)}
            for name, reason in (refused or {}).items()
        ]
        self.held: dict[str, Held] = {}
        """Model name -> its versions loaded in this replica."""
        self.remote = {name: RemoteModel(h) for name, h in (own_deployments or {}).items()}
        """Model name -> the ModelServer deployment that holds it."""
        self.followers: list[asyncio.Task] = []
        self.batchers: dict[str, Batcher] = {}
        self.work = WorkPools()
        self.recorder = Recorder()
        self.model_metrics = ModelMetrics(self.recorder)
        self.traffic = Traffic(settings, self.versions, self.model_metrics)
        self.background: set[asyncio.Task] = set()
        logged = settings.prediction_log
        self.prediction_log = PredictionLog(logged) if logged.uri and logged.sample > 0 else None
        self.loaded = False
        """Whether the first `reconfigure` has loaded the models (readiness)."""
        self.held_requests = held_requests()
        """The host's table of requests in gateway replicas' hands (a crash's are not
        replayed)."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = FastAPI(
            title="rayline",
            version=__version__,
            description="Every registered rayline model over HTTP/JSON.",
        )
        api.state.models = self
        protocols = {kind: s.protocol() for kind, s in self.served.items() if s.protocol}
        infer_routes, protocol_routes = protocol_routers(protocols, __version__)
        routers = [*(served.routes() for served in self.served.values()), infer_routes]
        for router in [*routers, core_router(), protocol_routes]:
            # The routes themselves, not `include_router`: FastAPI 0.165 wraps an included
            # router in a matcher that every request passing it pays for (it re-counts
            # the router's routes and rewrites the scope each time); a route is one regex.
            # Measured: docs/benchmarks.md, the protocol's cost. Tried in this order.
            api.router.routes.extend(router.routes)
        api.add_exception_handler(RequestValidationError, schema_error)
        observation = Observation(
            RouteMetrics(self.recorder), self.traffic.judge, self.prediction_log
        )
        api.add_middleware(
            Guard,
            max_body_bytes=self.settings.max_body_bytes,
            api_key_sha256=self.settings.api_key_sha256 or None,
            observation=observation,
            held_requests=self.held_requests,
        )
        return api

    async def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        poll_s = float(user_config.get("poll_s", 10.0))
        with_canary = self.traffic.with_canary()
        held = {
            name: Held(
                self.registry,
                name,
                self.served[kind].load,
                ref,
                poll_s,
                self.settings.canary.alias if name in with_canary else None,
            )
            for name, kind in self.kinds.items()
            if name not in self.remote
        }
        followers = await load_and_follow(held.values(), self.followers)
        self.held = held
        self.loaded = True
        loop = asyncio.get_running_loop()
        self.followers = followers + [
            loop.create_task(r.follow(poll_s)) for r in self.remote.values()
        ]
        if not self.background:
            lag = LoopLag(self.recorder)
            for work in (self.publish_gauges(), self.recorder.run(), lag.run()):
                self.background.add(loop.create_task(work))
            if self.prediction_log is not None:
                self.background.add(loop.create_task(self.prediction_log.run()))

    async def publish_gauges(self) -> None:
        """The traffic's gauges and each held model's drift, set again every few seconds
        (Ray's metrics agent stops exporting a gauge that nobody sets for a while). A
        deployment of its own publishes its model's drift itself."""
        while True:
            self.traffic.publish()
            for name, held in self.held.items():
                await publish_drift(self.model_metrics, name, held.serving)
            await asyncio.sleep(5)

    async def drift(self, name: str) -> dict:
        """What GET /models/{name}/drift answers."""
        if self.kinds.get(name) and name in self.remote:
            return await self.answer(self.remote[name].handle.drift.remote())
        held = self.held.get(name)
        try:
            return drift_report(name, held.serving if held else None)
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def versions(self, name: str) -> Versions:
        """(serving, canary) versions of the model, wherever it is held."""
        if name in self.remote:
            held = self.remote[name].versions
            return held["serving"], held["canary"]
        return self.held[name].versions()

    def role_for(self, name: str, key: str | None, version: int | None) -> str:
        try:
            return self.traffic.role_for(name, key, version)
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def kind_of(self, name: str) -> str | None:
        return self.kinds.get(name)

    def names(self) -> list[str]:
        return list(self.kinds)

    def served_versions(self, name: str) -> list[int]:
        if name not in self.kinds or (name not in self.remote and name not in self.held):
            return []
        return sorted({v for v in self.versions(name) if v is not None})

    def ready(self) -> bool:
        return self.loaded

    def __del__(self):
        if self.prediction_log is not None:  # what is held, at a graceful stop
            self.prediction_log.flush()

    # The routes' `Models` (rayline.serving.http).

    def local(
        self, name: str | None, kind: str, key: str | None = None, version: int | None = None
    ) -> Any | None:
        if not self.loaded:
            raise HTTPException(
                status_code=503,
                detail="this replica is loading its models; retry shortly",
                headers={"Retry-After": "1"},
            )
        if self.kinds.get(name) != kind:
            held = None
        elif name in self.remote:
            return None
        else:
            held = self.held.get(name)
        if held is None or held.serving.current is None:
            raise self.not_served(name, kind, held)
        role = self.role_for(name, key, version)
        predictor = held.predictor(role)
        answered_by(name, role, predictor.version.version)
        return predictor

    def not_served(self, name: str | None, kind: str, held: Held | None) -> HTTPException:
        """404 naming the models of `kind` that are served, and why `name` is not."""
        known = ", ".join(
            sorted(
                n
                for n, k in self.kinds.items()
                if k == kind and (n in self.remote or self.held[n].serving.current)
            )
        )
        why = f"; {name!r} is not served: {held.serving.problems()[-1]['reason']}" if held else ""
        what = self.served[kind].what if kind in self.served else kind
        detail = f"no {what} {name!r} (known: {known or 'none deployed'}){why}"
        return HTTPException(status_code=404, detail=detail)

    async def call(
        self,
        name: str | None,
        kind: str,
        method: str,
        *args,
        key: str | None = None,
        heavy: bool = False,
        version: int | None = None,
    ) -> tuple[int, Any]:
        if self.kinds.get(name) == kind and name in self.remote:
            handle = self.remote[name].handle
            role = self.role_for(name, key, version)
            # Named before the call: a 4xx from the held version is that version's too.
            expected = self.versions(name)[role == "canary"]
            if expected is not None:
                answered_by(name, role, expected)
            call = handle.call.remote(method, *args, role=role, heavy=heavy)
            role, answered, answer = await self.answer(call)
            answered_by(name, role, answered)  # what held it by then (the last one counts)
            if role == "serving":
                self.shadow(name, method, args, answer)
            return answered, answer
        service = self.local(name, kind, key, version)
        answer = await self.run(name, getattr(service, method), *args, heavy=heavy)
        self.shadow(name, method, args, answer)
        return service.version.version, answer

    def shadow(self, name: str, method: str, args: tuple, answer: Any) -> None:
        if name in self.traffic.shadows:
            agreement = functools.partial(self.served[self.kinds[name]].agreement, method)
            canary_answer = functools.partial(self.canary_answer, name, method, args)
            self.traffic.shadow(name, answer, canary_answer, agreement)

    async def canary_answer(self, name: str, method: str, args: tuple) -> tuple[int, Any] | None:
        """(version, answer) of the model's canary, wherever it is held; None when it
        holds none by now."""
        if name in self.remote:
            call = self.remote[name].handle.call.remote(method, *args, role="canary")
            role, version, answer = await asyncio.wait_for(call, self.request_timeout_s)
            return (version, answer) if role == "canary" else None
        canary = self.held[name].predictor("canary")
        if canary is None:
            return None
        answer = await asyncio.wait_for(
            self.work.run(f"{name} canary", getattr(canary, method), *args),
            self.request_timeout_s,
        )
        return canary.version.version, answer

    async def run(self, key: str, function: Callable, *args, heavy: bool = False) -> Any:
        """Past the timeout the client gets 504 while the replica keeps answering others
        (the thread finishes in the background, its place in `key`'s lane taken until
        then)."""
        return await self.answer(self.work.run(key, function, *args, heavy=heavy))

    async def answer(self, awaitable: Awaitable) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(
                status_code=504, detail=f"no answer within {self.request_timeout_s:g}s"
            ) from None
        except BadInput as exc:
            raise refused(exc) from None
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except Busy as exc:
            raise HTTPException(
                status_code=503, detail=str(exc), headers={"Retry-After": "1"}
            ) from None

    def batcher(self, key: str, compute: Callable[[list], Awaitable[list]], max_batch: int):
        if key not in self.batchers:
            self.batchers[key] = Batcher(compute, max_batch)
        return self.batchers[key]

    def default(self, kind: str) -> str | None:
        names = sorted(n for n, k in self.kinds.items() if k == kind)
        return names[0] if names else None

    async def listing(self) -> dict:
        """What /models answers: the versions served (a canary beside its model, with
        the share of this replica's answers each gave), those refused, with why, and the
        canaries this replica rolled back."""
        status = {name: held.status() for name, held in self.held.items()}
        status.update(await self.remote_status())
        refused = list(self.refused_at_build)
        served = []
        for name, (serving, canary, problems) in status.items():
            refused += problems
            if serving is not None:
                served += self.traffic.listed(name, serving, canary)
        listing = {"models": served, "refused": refused, "rolled_back": self.traffic.rolled_back()}
        if self.prediction_log is not None:
            listing["prediction_log"] = self.prediction_log.status()
        return listing

    async def remote_status(self) -> dict[str, tuple]:
        """Each deployment of its own's `ModelServer.status()`, or a refusal when its
        replicas are restarting or hung: never awaited for ever."""
        status = {}
        for name, remote in self.remote.items():
            try:
                status[name] = await asyncio.wait_for(
                    remote.handle.status.remote(), STATUS_TIMEOUT_S
                )
            except Exception as exc:
                why = "no answer" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
                reason = f"its deployment's status: {why} within {STATUS_TIMEOUT_S:g}s"
                status[name] = (None, None, [{"name": name, "version": None, "reason": reason}])
        return status
