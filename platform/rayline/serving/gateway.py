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
has a canary share (rayline.serving.canary).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from ray import serve

from rayline import __version__
from rayline.serving.base import BadInput, NotFound, ServedKind, describe
from rayline.serving.batching import Batcher
from rayline.serving.canary import Rollout, Shadowing
from rayline.serving.following import Following
from rayline.serving.guard import Guard, answered_by, schema_error
from rayline.serving.http import ERRORS, json_response, refused
from rayline.serving.inference_protocol import requested_version
from rayline.serving.inference_protocol import routers as protocol_routers
from rayline.serving.metrics import ModelMetrics, Recorder, RouteMetrics
from rayline.serving.model_server import RemoteModel, drift_report, publish_drift
from rayline.serving.prediction_log import PredictionLog
from rayline.serving.settings import ServeArgs
from rayline.serving.work import Busy, WorkPools
from rayline.store import ModelRegistry, RegistryError

logger = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
"""How long /models waits for a deployment of its own to say what it holds."""
MAX_SHADOW_CALLS = 64
"""Shadow calls in flight per replica; past it the shadow skips requests (counted)."""


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
        if models.work.saturated(models.models):
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=128)
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
        self.store_uri = settings.store_uri
        self.max_body_bytes = settings.max_body_bytes
        self.api_key_sha256 = settings.api_key_sha256 or None
        # Serving only reads: no folders made, no probe written, read-only credentials do.
        self.registry = ModelRegistry(self.store_uri, create=False, read_only=True)
        self.kinds, self.served = kinds, served
        self.batching, self.request_timeout_s = settings.batching, settings.request_timeout_s
        self.refused_at_build = [
            {"name": name, "version": None, "reason": self.registry.redact(reason)}
            for name, reason in (refused or {}).items()
        ]
        self.models: dict[str, Following] = {}
        self.remote = {name: RemoteModel(h) for name, h in (own_deployments or {}).items()}
        """Model name -> the ModelServer deployment that holds it."""
        self.followers: list[asyncio.Task] = []
        self.batchers: dict[str, Batcher] = {}
        self.work = WorkPools()
        self.canary_args = settings.canary
        self.rollouts = {
            name: Rollout(name, fraction, self.canary_args)
            for name, fraction in settings.canary_fraction.items()
            if fraction > 0
        }
        self.canaries: dict[str, Following] = {}
        self.shadows = {name: Shadowing() for name in settings.shadow}
        self.shadow_calls: set[asyncio.Task] = set()
        self.recorder = Recorder()
        self.model_metrics = ModelMetrics(self.recorder)
        self.background: set[asyncio.Task] = set()
        logged = settings.prediction_log
        self.prediction_log = PredictionLog(logged) if logged.uri and logged.sample > 0 else None
        self.log_writer: asyncio.Task | None = None
        self.gauges: asyncio.Task | None = None
        self.loaded = False
        """Whether the first `reconfigure` has loaded the models (readiness)."""

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
        api.add_middleware(
            Guard,
            max_body_bytes=self.max_body_bytes,
            api_key_sha256=self.api_key_sha256,
            metrics=RouteMetrics(self.recorder),
            on_answer=self.on_answer,
            prediction_log=self.prediction_log,
        )
        return api

    async def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        poll_s = float(user_config.get("poll_s", 10.0))
        models = {
            name: Following(self.registry, name, self.served[kind].load, ref, poll_s)
            for name, kind in self.kinds.items()
            if name not in self.remote
        }
        canaries = {
            name: Following(
                self.registry,
                name,
                self.served[self.kinds[name]].load,
                self.canary_args.alias,
                poll_s,
                optional=True,
            )
            for name in [*self.rollouts, *self.shadows]
            if name not in self.remote
        }
        await asyncio.gather(
            *(asyncio.to_thread(m.load) for m in [*models.values(), *canaries.values()])
        )
        for task in self.followers:
            task.cancel()
        self.models, self.canaries = models, canaries
        self.loaded = True
        loop = asyncio.get_running_loop()
        self.followers = [
            loop.create_task(m.follow()) for m in [*models.values(), *canaries.values()]
        ] + [loop.create_task(r.follow(poll_s)) for r in self.remote.values()]
        if self.gauges is None:
            self.gauges = loop.create_task(self.publish_gauges())
            self.background.add(loop.create_task(self.recorder.run()))
        if self.prediction_log is not None and self.log_writer is None:
            self.log_writer = loop.create_task(self.prediction_log.run())

    async def publish_gauges(self) -> None:
        """Each canary's share and each held model's drift, set again every few seconds
        (Ray's metrics agent stops exporting a gauge that nobody sets for a while). A
        deployment of its own publishes its model's drift itself."""
        while True:
            for name in self.rollouts:
                self.model_metrics.canary(name, self.canary_share(name))
            self.model_metrics.publish_rollback_times()
            for name, following in self.models.items():
                await publish_drift(self.model_metrics, name, following)
            await asyncio.sleep(5)

    async def drift(self, name: str) -> dict:
        """What GET /models/{name}/drift answers."""
        if self.kinds.get(name) and name in self.remote:
            return await self.answer(self.remote[name].handle.drift.remote())
        try:
            return drift_report(name, self.models.get(name))
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    def versions(self, name: str) -> tuple[int | None, int | None]:
        """(serving, canary) versions of the model, wherever it is held."""
        if name in self.remote:
            held = self.remote[name].versions
            return held["serving"], held["canary"]
        serving, canary = self.models[name].current, self.canaries.get(name)
        canary = canary.current if canary is not None else None
        return (
            serving.version.version if serving is not None else None,
            canary.version.version if canary is not None else None,
        )

    def takes_canary(self, name: str, key: str | None) -> bool:
        """Whether this request goes to the model's canary: it has a share, a canary
        that differs from the serving version and was not rolled back, and the draw."""
        rollout = self.rollouts.get(name)
        if rollout is None:
            return False
        serving, canary = self.versions(name)
        return canary != serving and rollout.takes_canary(canary, key)

    def role_for(self, name: str, key: str | None) -> str:
        """Which of the model's versions answers this request, "serving" or "canary": the
        version an Open Inference Protocol route names (404 when it is not served now),
        else the canary split's draw."""
        wanted = requested_version()
        if wanted is None:
            return "canary" if self.takes_canary(name, key) else "serving"
        serving, canary = self.versions(name)
        if wanted in (serving, canary):
            return "serving" if wanted == serving else "canary"
        raise HTTPException(
            status_code=404,
            detail=f"{name} has no version {wanted} served (serving: {serving}, canary: {canary})",
        )

    def canary_share(self, name: str) -> float:
        """The share the model's canary takes now: 0 while it has none that is live (the
        alias unset, at the serving version, or rolled back here)."""
        serving, canary = self.versions(name)
        rollout = self.rollouts[name]
        if canary is None or canary == serving or canary in rollout.rolled_back:
            return 0.0
        return rollout.fraction

    def kind_of(self, name: str) -> str | None:
        return self.kinds.get(name)

    def names(self) -> list[str]:
        return list(self.kinds)

    def served_versions(self, name: str) -> list[int]:
        if name not in self.kinds or (name not in self.remote and name not in self.models):
            return []
        return sorted({v for v in self.versions(name) if v is not None})

    def ready(self) -> bool:
        return self.loaded

    def __del__(self):
        if self.prediction_log is not None:  # what is held, at a graceful stop
            self.prediction_log.flush()

    # The routes' `Models` (rayline.serving.http).

    def local(self, name: str | None, kind: str, key: str | None = None) -> Any | None:
        if not self.loaded:
            raise HTTPException(
                status_code=503,
                detail="this replica is loading its models; retry shortly",
                headers={"Retry-After": "1"},
            )
        if self.kinds.get(name) != kind:
            following = None
        elif name in self.remote:
            return None
        else:
            following = self.models.get(name)
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
            what = self.served[kind].what if kind in self.served else kind
            raise HTTPException(
                status_code=404,
                detail=f"no {what} {name!r} (known: {known or 'none deployed'}){why}",
            )
        if self.role_for(name, key) == "canary":
            canary = self.canaries[name].current
            answered_by(name, "canary", canary.version.version)
            return canary
        answered_by(name, "serving", following.current.version.version)
        return following.current

    async def call(
        self,
        name: str | None,
        kind: str,
        method: str,
        *args,
        key: str | None = None,
        heavy: bool = False,
    ) -> tuple[int, Any]:
        if self.kinds.get(name) == kind and name in self.remote:
            handle = self.remote[name].handle
            role = self.role_for(name, key)
            # Named before the call: a 4xx from the held version is that version's too.
            expected = self.versions(name)[role == "canary"]
            if expected is not None:
                answered_by(name, role, expected)
            call = handle.call.remote(method, *args, role=role, heavy=heavy)
            role, version, answer = await self.answer(call)
            answered_by(name, role, version)  # what held it by then (the last one counts)
            if role == "serving":
                self.shadow(name, method, args, answer)
            return version, answer
        service = self.local(name, kind, key)
        answer = await self.run(name, getattr(service, method), *args, heavy=heavy)
        self.shadow(name, method, args, answer)
        return service.version.version, answer

    def shadow(self, name: str, method: str, args: tuple, answer: Any) -> None:
        """For a shadowed model: the same call on its canary, in the background (never
        awaited here), compared with the serving answer. At most MAX_SHADOW_CALLS run at
        once; past that a call is skipped, counted."""
        shadowing = self.shadows.get(name)
        if shadowing is None or self.versions(name)[1] is None:
            return
        if len(self.shadow_calls) >= MAX_SHADOW_CALLS:
            shadowing.skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow(name, method, args, answer))
        self.shadow_calls.add(task)
        task.add_done_callback(self.shadow_calls.discard)

    async def canary_answer(self, name: str, method: str, args: tuple) -> tuple[int, Any] | None:
        """(version, answer) of the model's canary, wherever it is held; None when it
        holds none by now."""
        if name in self.remote:
            call = self.remote[name].handle.call.remote(method, *args, role="canary")
            role, version, answer = await asyncio.wait_for(call, self.request_timeout_s)
            return (version, answer) if role == "canary" else None
        canary = self.canaries[name].current
        if canary is None:
            return None
        answer = await asyncio.wait_for(
            self.work.run(f"{name} canary", getattr(canary, method), *args),
            self.request_timeout_s,
        )
        return canary.version.version, answer

    async def _shadow(self, name: str, method: str, args: tuple, answer: Any):
        shadowing = self.shadows[name]
        try:
            theirs = await self.canary_answer(name, method, args)
            if theirs is None:
                return
            if isinstance(answer, bytes):  # a batched route's encoded answer
                answer = json.loads(answer)
            measures = self.served[self.kinds[name]].agreement(method, answer, theirs[1])
        except Exception as exc:  # the canary's failure is a figure, never the client's
            shadowing.errors += 1
            shadowing.last_error = f"{type(exc).__name__}: {exc}"
            return
        shadowing.add(measures)
        self.model_metrics.shadowed(name, theirs[0], measures)

    def on_answer(self, answered: tuple, status: int, latency_s: float) -> None:
        """After each model route's answer (the guard calls it): the version's metrics,
        and the canary's window, judged."""
        name, role, version = answered
        self.model_metrics.answered(name, version, role, status, latency_s)
        rollout = self.rollouts.get(name)
        if rollout is None:
            return
        rollout.record(role, version, status >= 400, latency_s)
        if role != "canary":
            return
        serving = self.versions(name)[0]
        verdict = rollout.verdict(serving, version)
        if verdict is not None:
            self.roll_back(name, version, serving, verdict)

    def roll_back(self, name: str, version: int, serving: int | None, verdict: dict) -> None:
        """No more canary traffic from this replica at once; the alias removed and the
        history told off the request path."""
        rollout = self.rollouts[name]
        rollout.rolled_back[version] = verdict["reason"]
        logger.warning("rayline: canary %s v%s rolled back: %s", name, version, verdict["reason"])
        self.model_metrics.rolled_back(name, version)

        def record() -> None:
            try:
                registry = ModelRegistry(self.store_uri, create=False)
                registry.roll_back(
                    name, self.canary_args.alias, version, serving=serving, **verdict
                )
            except (RegistryError, OSError) as exc:  # traffic is stopped here either way
                logger.warning("rayline: rollback of %s v%s not recorded: %s", name, version, exc)

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(record))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

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
        held: dict[str, tuple[dict | None, dict | None]] = {}
        refused = list(self.refused_at_build)
        for name, following in self.models.items():
            canary = self.canaries[name].current if name in self.canaries else None
            held[name] = (
                describe(following.current.version) if following.current else None,
                describe(canary.version) if canary else None,
            )
        for following in [*self.models.values(), *self.canaries.values()]:
            refused += following.problems()
        for name, remote in self.remote.items():
            try:
                serving, canary, problems = await asyncio.wait_for(
                    remote.handle.status.remote(), STATUS_TIMEOUT_S
                )
            # Its replicas restarting, or hung: listed as refused, never awaited for ever.
            except Exception as exc:
                why = "no answer" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
                refused.append(
                    {
                        "name": name,
                        "version": None,
                        "reason": f"its deployment's status: {why} within {STATUS_TIMEOUT_S:g}s",
                    }
                )
                continue
            held[name] = serving, canary
            refused += problems
        served = []
        for name, (serving, canary) in held.items():
            if serving is None:
                continue
            rollout, shadowing = self.rollouts.get(name), self.shadows.get(name)
            share = rollout.share("serving") if rollout and rollout.answered else 1.0
            served.append({**serving, "role": "serving", "share": share})
            if canary is not None and shadowing is not None:
                served.append({**canary, "role": "shadow", **shadowing.status()})
            if canary is not None and rollout and canary["version"] != serving["version"]:
                served.append(
                    {
                        **canary,
                        "role": "canary",
                        "share": rollout.share("canary"),
                        "canary_fraction": rollout.fraction,
                        "rolled_back": rollout.rolled_back.get(canary["version"]),
                    }
                )
        rolled_back = [
            {"name": name, "version": version, "reason": reason}
            for name, rollout in self.rollouts.items()
            for version, reason in rollout.rolled_back.items()
        ]
        listing = {"models": served, "refused": refused, "rolled_back": rolled_back}
        if self.prediction_log is not None:
            listing["prediction_log"] = self.prediction_log.status()
        return listing
