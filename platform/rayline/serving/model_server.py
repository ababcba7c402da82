"""A model in a deployment of its own (`own_deployments` in ServeArgs): `ModelServer`,
its replicas' deployment, and `RemoteModel`, the gateway's view of it. Also what both
the gateway and a model server answer about a held model's drift."""

import asyncio
import logging
from typing import Any

from ray import serve

from rayline.serving.base import NotFound, ServedKind
from rayline.serving.following import Following
from rayline.serving.metrics import LoopLag, ModelMetrics, Recorder
from rayline.serving.settings import SHUTDOWN_CHECK_S
from rayline.serving.traffic import Held, load_and_follow
from rayline.serving.work import WorkPools
from rayline.store import ModelRegistry

logger = logging.getLogger("ray.serve")


def drift_report(name: str, following: Following | None) -> dict:
    """What GET /models/{name}/drift answers for the model `following` holds (NotFound
    when nothing is held or the version keeps no reference profile)."""
    if following is None or following.current is None:
        raise NotFound(f"no model {name!r} is served here")
    window = getattr(following.current, "drift", None)
    version = following.current.version.version
    if window is None:
        raise NotFound(
            f"model {name!r} v{version} has no reference profile (its family keeps "
            "none yet, or it was registered before profiles were kept)"
        )
    return {"name": name, "version": version, **window.report()}


async def publish_drift(metrics: ModelMetrics, name: str, following: Following) -> None:
    """The drift gauges of the version `following` holds, if it keeps a profile."""
    window = getattr(following.current, "drift", None)
    if window is not None:
        report = await asyncio.to_thread(window.report)
        metrics.drift(name, following.current.version.version, report)


class RemoteModel:
    """A model held by a deployment of its own, as the gateway sees it: the handle, and
    the versions its replicas hold (serving and canary), asked every poll so that the
    canary split is decided here without an extra hop."""

    def __init__(self, handle):
        self.handle = handle
        self.versions: dict[str, int | None] = {"serving": None, "canary": None}
        self.last_error = ""

    async def follow(self, poll_s: float) -> None:
        while True:
            try:
                self.versions = await self.handle.versions.remote()
            except Exception as exc:  # its replicas restarting: keep the last answer
                if str(exc) != self.last_error:
                    self.last_error = str(exc)
                    logger.warning("rayline: versions of %s not known: %s", self.handle, exc)
            await asyncio.sleep(poll_s)


@serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=32,
    graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S,
)
class ModelServer:
    """One model in a deployment of its own (`own_deployments`): its own replicas, GPUs
    and autoscaling, behind the gateway's routes, which reach it through a deployment
    handle. It holds the model as a gateway replica does (`Held`: the alias followed,
    and its `canary_alias` where the gateway splits or shadows the model); the gateway's
    `Traffic` decides which version answers, this replica answers with it and keeps the
    drift window of what it served."""

    def __init__(
        self, store_uri: str, name: str, served: ServedKind, canary_alias: str | None = None
    ):
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.name, self.served, self.canary_alias = name, served, canary_alias
        self.held: Held | None = None
        self.followers: list[asyncio.Task] = []
        self.recorder = Recorder()
        self.model_metrics = ModelMetrics(self.recorder)
        self.background: list[asyncio.Task] = []
        self.work = WorkPools()

    async def reconfigure(self, user_config: dict) -> None:
        ref, poll_s = user_config.get("ref", "production"), float(user_config.get("poll_s", 10.0))
        held = Held(self.registry, self.name, self.served.load, ref, poll_s, self.canary_alias)
        self.followers = await load_and_follow([held], self.followers)
        self.held = held
        if not self.background:
            loop, lag = asyncio.get_running_loop(), LoopLag(self.recorder)
            for work in (self.publish_gauges(), self.recorder.run(), lag.run()):
                self.background.append(loop.create_task(work))

    async def publish_gauges(self) -> None:
        while True:
            if self.held is not None:
                await publish_drift(self.model_metrics, self.name, self.held.serving)
            await asyncio.sleep(5)

    async def call(
        self, method: str, *args, role: str = "serving", heavy: bool = False
    ) -> tuple[str, int, Any]:
        """(role, version, answer) of the held model's `method`, run in its worker
        threads (the heavy lane if `heavy`): the canary's when asked for and held, else
        the serving version's."""
        held = self.held
        service = held.predictor(role) if held is not None else None
        if service is None and role == "canary" and held is not None:
            role, service = "serving", held.predictor("serving")
        if service is None:
            problems = held.serving.problems() if held is not None else []
            why = f": {problems[-1]['reason']}" if problems else ""
            raise NotFound(f"model {self.name!r} is not served{why}")
        answer = await self.work.run(self.name, getattr(service, method), *args, heavy=heavy)
        return role, service.version.version, answer

    def versions(self) -> dict[str, int | None]:
        serving, canary = self.held.versions() if self.held is not None else (None, None)
        return {"serving": serving, "canary": canary}

    def drift(self) -> dict:
        return drift_report(self.name, self.held.serving if self.held is not None else None)

    def status(self) -> tuple[dict | None, dict | None, list[dict]]:
        """(the serving version as /models lists it, the canary's, the versions refused)."""
        return self.held.status() if self.held is not None else (None, None, [])
