"""A model in a deployment of its own (`own_deployments` in ServeArgs): `ModelServer`,
its replicas' deployment, and `RemoteModel`, the gateway's view of it. Also what both
the gateway and a model server answer about a held model's drift."""

import asyncio
import logging
from typing import Any

from ray import serve

from rayline.serving.base import NotFound, ServedKind, describe
from rayline.serving.following import Following
from rayline.serving.metrics import ModelMetrics, Recorder
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class ModelServer:
    """One model in a deployment of its own (`own_deployments`): its own replicas, GPUs
    and autoscaling, behind the gateway's routes, which reach it through a deployment
    handle. Like the gateway it follows the model's alias (see `Following`), and its
    `canary_alias` where the gateway splits or shadows the model; the gateway decides
    which answers, this replica holds both and keeps the drift window of what it
    served."""

    def __init__(
        self, store_uri: str, name: str, served: ServedKind, canary_alias: str | None = None
    ):
        self.registry = ModelRegistry(store_uri, create=False, read_only=True)
        self.name, self.served, self.canary_alias = name, served, canary_alias
        self.following: Following | None = None
        self.canary: Following | None = None
        self.followers: list[asyncio.Task] = []
        self.model_metrics = ModelMetrics(Recorder())
        self.gauges: asyncio.Task | None = None
        self.work = WorkPools()

    async def reconfigure(self, user_config: dict) -> None:
        ref, poll_s = user_config.get("ref", "production"), float(user_config.get("poll_s", 10.0))
        following = Following(self.registry, self.name, self.served.load, ref, poll_s)
        canary = None
        if self.canary_alias:
            canary = Following(
                self.registry, self.name, self.served.load, self.canary_alias, poll_s, True
            )
        held = [f for f in (following, canary) if f is not None]
        await asyncio.gather(*(asyncio.to_thread(f.load) for f in held))
        for task in self.followers:
            task.cancel()
        self.following, self.canary = following, canary
        loop = asyncio.get_running_loop()
        self.followers = [loop.create_task(f.follow()) for f in held]
        if self.gauges is None:
            self.gauges = loop.create_task(self.publish_gauges())

    async def publish_gauges(self) -> None:
        while True:
            if self.following is not None:
                await publish_drift(self.model_metrics, self.name, self.following)
            await asyncio.sleep(5)

    async def call(
        self, method: str, *args, role: str = "serving", heavy: bool = False
    ) -> tuple[str, int, Any]:
        """(role, version, answer) of the held model's `method`, run in its worker
        threads (the heavy lane if `heavy`): the canary's when asked for and held, else
        the serving version's."""
        service = self.canary.current if role == "canary" and self.canary else None
        if service is None:
            role = "serving"
            service = self.following.current if self.following else None
        if service is None:
            problems = self.following.problems() if self.following else []
            why = f": {problems[-1]['reason']}" if problems else ""
            raise NotFound(f"model {self.name!r} is not served{why}")
        answer = await self.work.run(self.name, getattr(service, method), *args, heavy=heavy)
        return role, service.version.version, answer

    def versions(self) -> dict[str, int | None]:
        held = {"serving": self.following, "canary": self.canary}
        return {
            role: f.current.version.version if f is not None and f.current else None
            for role, f in held.items()
        }

    def drift(self) -> dict:
        return drift_report(self.name, self.following)

    def status(self) -> tuple[dict | None, dict | None, list[dict]]:
        """(the serving version as /models lists it, the canary's, the versions refused)."""
        held = [f for f in (self.following, self.canary) if f is not None]
        serving, canary = (
            describe(f.current.version) if f is not None and f.current else None
            for f in (self.following, self.canary)
        )
        return serving, canary, [problem for f in held for problem in f.problems()]
