"""The gateway: a Ray Serve ingress deployment whose replicas hold every promoted model
(no hop to another process per request, which measured several times faster than one
deployment per model) and answer the routes the families declare, and `ModelServer`,
a deployment of its own for a heavy model (`own_deployments`).

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
from rayline.serving.canary import CanaryArgs, Rollout
from rayline.serving.following import Following
from rayline.serving.guard import Guard, ModelMetrics, RouteMetrics, answered_by, schema_error
from rayline.serving.http import ERRORS, MAX_BODY_BYTES, json_response
from rayline.serving.prediction_log import PredictionLog, PredictionLogArgs
from rayline.store import ModelRegistry, RegistryError

logger = logging.getLogger("ray.serve")
MAX_SHADOW_CALLS = 64
"""Shadow calls in flight per replica; past it the shadow skips requests (counted)."""


class Shadowing:
    """One shadowed model's figures in this replica: the measures' running means."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.compared = self.skipped = self.errors = 0
        self.last_error = ""

    def add(self, measures: dict[str, float]) -> None:
        self.compared += 1
        for measure, value in measures.items():
            self.sums[measure] = self.sums.get(measure, 0.0) + value

    def status(self) -> dict:
        means = {m: total / self.compared for m, total in self.sums.items()}
        return {
            "compared": self.compared,
            "skipped": self.skipped,
            "errors": self.errors,
            "last_error": self.last_error or None,
            **{f"mean_{m}": round(v, 6) for m, v in means.items()},
        }


def core_router() -> APIRouter:
    routes = APIRouter()

    @routes.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @routes.get("/models", responses={401: ERRORS[401]})
    async def models_info(request: Request):
        return json_response(await request.app.state.models.listing())

    @routes.get("/models/{name}/drift", responses={401: ERRORS[401], 404: ERRORS[404]})
    async def drift(name: str, request: Request):
        """PSI of what this replica served lately against the serving version's
        reference profile, per feature and for the outputs (rayline.drift)."""
        return json_response(request.app.state.models.drift(name))

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
        store_uri: str,
        kinds: dict[str, str],
        served: dict[str, ServedKind],
        batching: bool = True,
        request_timeout_s: float = 30.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        refused: dict[str, str] | None = None,
        api_key_sha256: str | None = None,
        front=None,
        own_deployments: dict | None = None,
        canary_fraction: dict[str, float] | None = None,
        canary: CanaryArgs | None = None,
        shadow: list[str] | None = None,
        prediction_log: PredictionLogArgs | None = None,
    ):
        del front  # bound only so that Serve deploys it with the application
        self.store_uri = store_uri
        self.max_body_bytes, self.api_key_sha256 = max_body_bytes, api_key_sha256
        # Serving only reads: no folders made, no probe written, read-only credentials do.
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.kinds, self.served = kinds, served
        self.batching, self.request_timeout_s = batching, request_timeout_s
        self.refused_at_build = [
            {"name": name, "version": None, "reason": reason}
            for name, reason in (refused or {}).items()
        ]
        self.models: dict[str, Following] = {}
        self.remote: dict = own_deployments or {}
        """Model name -> handle of the ModelServer deployment that holds it."""
        self.followers: list[asyncio.Task] = []
        self.batchers: dict[str, Batcher] = {}
        self.canary_args = canary or CanaryArgs()
        self.rollouts = {
            name: Rollout(name, fraction, self.canary_args)
            for name, fraction in (canary_fraction or {}).items()
            if fraction > 0
        }
        self.canaries: dict[str, Following] = {}
        self.shadows = {name: Shadowing() for name in shadow or []}
        self.shadow_calls: set[asyncio.Task] = set()
        self.model_metrics = ModelMetrics()
        self.background: set[asyncio.Task] = set()
        self.prediction_log = (
            PredictionLog(prediction_log)
            if prediction_log and prediction_log.uri and prediction_log.sample > 0
            else None
        )
        self.log_writer: asyncio.Task | None = None
        self.gauges: asyncio.Task | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = FastAPI(
            title="rayline",
            version=__version__,
            description="Every registered rayline model over HTTP/JSON.",
        )
        api.state.models = self
        api.include_router(core_router())
        for served in self.served.values():
            api.include_router(served.routes())
        api.add_exception_handler(RequestValidationError, schema_error)
        api.add_middleware(
            Guard,
            max_body_bytes=self.max_body_bytes,
            api_key_sha256=self.api_key_sha256,
            metrics=RouteMetrics(),
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
        }
        await asyncio.gather(
            *(asyncio.to_thread(m.load) for m in [*models.values(), *canaries.values()])
        )
        for task in self.followers:
            task.cancel()
        self.models, self.canaries = models, canaries
        loop = asyncio.get_running_loop()
        self.followers = [
            loop.create_task(m.follow()) for m in [*models.values(), *canaries.values()]
        ]
        if self.gauges is None:
            self.gauges = loop.create_task(self.publish_gauges())
        if self.prediction_log is not None and self.log_writer is None:
            self.log_writer = loop.create_task(self.prediction_log.run())

    async def publish_gauges(self) -> None:
        """Each canary's share and each model's drift, set again every few seconds (Ray's
        metrics agent also stops exporting a gauge that nobody sets for a while)."""
        while True:
            for name in self.rollouts:
                self.model_metrics.canary(name, self.canary_share(name))
            for name, following in self.models.items():
                window = getattr(following.current, "drift", None)
                if window is not None:
                    report = await asyncio.to_thread(window.report)
                    self.model_metrics.drift(name, following.current.version.version, report)
            await asyncio.sleep(5)

    def drift(self, name: str) -> dict:
        """What GET /models/{name}/drift answers."""
        following = self.models.get(name)
        if following is None or following.current is None:
            raise HTTPException(status_code=404, detail=f"no model {name!r} is served here")
        window = getattr(following.current, "drift", None)
        version = following.current.version.version
        if window is None:
            raise HTTPException(
                status_code=404,
                detail=f"model {name!r} v{version} has no reference profile (its family keeps "
                "none yet, or it was registered before profiles were kept)",
            )
        return {"name": name, "version": version, **window.report()}

    def canary_share(self, name: str) -> float:
        """The share the model's canary takes now: 0 while it has none that is live (the
        alias unset, at the serving version, or rolled back here)."""
        rollout, canary = self.rollouts[name], self.canaries[name].current
        serving = self.models[name].current
        if canary is None or canary.version.version in rollout.rolled_back:
            return 0.0
        if serving is not None and serving.version.version == canary.version.version:
            return 0.0
        return rollout.fraction

    def __del__(self):
        if self.prediction_log is not None:  # what is held, at a graceful stop
            self.prediction_log.flush()

    # The routes' `Models` (rayline.serving.http).

    def local(self, name: str | None, kind: str, key: str | None = None) -> Any | None:
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
        serving = following.current
        rollout = self.rollouts.get(name)
        if rollout is not None:
            canary = self.canaries[name].current
            version = canary.version.version if canary is not None else None
            if version != serving.version.version and rollout.takes_canary(version, key):
                answered_by(name, "canary", version)
                return canary
        answered_by(name, "serving", serving.version.version)
        return serving

    async def call(
        self, name: str | None, kind: str, method: str, *args, key: str | None = None
    ) -> tuple[int, Any]:
        if self.kinds.get(name) == kind and name in self.remote:
            version, answer = await self.answer(self.remote[name].call.remote(method, *args))
            answered_by(name, "serving", version)
            return version, answer
        service = self.local(name, kind, key)
        answer = await self.run(getattr(service, method), *args)
        self.shadow(name, method, args, answer)
        return service.version.version, answer

    def shadow(self, name: str, method: str, args: tuple, answer: Any) -> None:
        """For a shadowed model: the same call on its canary, in the background (never
        awaited here), compared with the serving answer. At most MAX_SHADOW_CALLS run at
        once; past that a call is skipped, counted."""
        shadowing = self.shadows.get(name)
        if shadowing is None or self.canaries[name].current is None:
            return
        if len(self.shadow_calls) >= MAX_SHADOW_CALLS:
            shadowing.skipped += 1
            return
        canary = self.canaries[name].current
        task = asyncio.get_running_loop().create_task(
            self._shadow(name, canary, method, args, answer)
        )
        self.shadow_calls.add(task)
        task.add_done_callback(self.shadow_calls.discard)

    async def _shadow(self, name: str, canary: Any, method: str, args: tuple, answer: Any):
        shadowing = self.shadows[name]
        try:
            theirs = await asyncio.wait_for(
                asyncio.to_thread(getattr(canary, method), *args), self.request_timeout_s
            )
            if isinstance(answer, bytes):  # a batched route's encoded answer
                answer = json.loads(answer)
            measures = self.served[self.kinds[name]].agreement(method, answer, theirs)
        except Exception as exc:  # the canary's failure is a figure, never the client's
            shadowing.errors += 1
            shadowing.last_error = f"{type(exc).__name__}: {exc}"
            return
        shadowing.add(measures)
        self.model_metrics.shadowed(name, canary.version.version, measures)

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
        serving = self.models[name].current
        verdict = rollout.verdict(serving.version.version if serving else None, version)
        if verdict is not None:
            self.roll_back(name, version, serving.version.version if serving else None, verdict)

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

    async def run(self, function: Callable, *args) -> Any:
        """Past the timeout the client gets 504 while the replica keeps answering others
        (the thread finishes in the background)."""
        return await self.answer(asyncio.to_thread(function, *args))

    async def answer(self, awaitable: Awaitable) -> Any:
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
        served = []
        for name, following in self.models.items():
            if following.current is None:
                continue
            rollout = self.rollouts.get(name)
            share = rollout.share("serving") if rollout and rollout.answered else 1.0
            served.append(
                {**describe(following.current.version), "role": "serving", "share": share}
            )
            shadowing = self.shadows.get(name)
            shadow = self.canaries[name].current if shadowing else None
            if shadow is not None:
                served.append({**describe(shadow.version), "role": "shadow", **shadowing.status()})
            canary = self.canaries[name].current if rollout else None
            if canary is not None and canary.version.version != following.current.version.version:
                served.append(
                    {
                        **describe(canary.version),
                        "role": "canary",
                        "share": rollout.share("canary"),
                        "canary_fraction": rollout.fraction,
                        "rolled_back": rollout.rolled_back.get(canary.version.version),
                    }
                )
        rolled_back = [
            {"name": name, "version": version, "reason": reason}
            for name, rollout in self.rollouts.items()
            for version, reason in rollout.rolled_back.items()
        ]
        refused = self.refused_at_build + [
            p for f in [*self.models.values(), *self.canaries.values()] for p in f.problems()
        ]
        for handle in self.remote.values():
            held, problems = await handle.status.remote()
            served += [{**held, "role": "serving", "share": 1.0}] if held else []
            refused += problems
        listing = {"models": served, "refused": refused, "rolled_back": rolled_back}
        if self.prediction_log is not None:
            listing["prediction_log"] = self.prediction_log.status()
        return listing


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class ModelServer:
    """One model in a deployment of its own (`own_deployments`): its own replicas, GPUs
    and autoscaling, behind the gateway's routes, which reach it through a deployment
    handle. Like the gateway it follows the model's alias (see `Following`)."""

    def __init__(self, store_uri: str, name: str, served: ServedKind):
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.name, self.served = name, served
        self.following: Following | None = None
        self.follower: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        ref = user_config.get("ref", "production")
        following = Following(
            self.registry, self.name, self.served.load, ref, float(user_config.get("poll_s", 10.0))
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
