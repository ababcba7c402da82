"""Which version of a model answers each request, and what its answers decide: the
traffic of one replica, apart from the routes and from where the models are held.

- `Held`: the versions of one model a replica holds, its alias's (serving) and, where
  the model has a canary share or a shadow, its canary alias's, each followed as it
  moves (rayline.serving.following). The gateway holds one per model it loads itself;
  a `ModelServer` (a deployment of its own) holds one for its model.
- `Traffic`: the gateway's decisions over every model it serves, wherever held: the
  canary split (`role_for`), the canary judged on each answer and rolled back
  (`judge`), shadow calls and their agreement (`shadow`), and what /models says of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from rayline.serving.base import NotFound, describe
from rayline.serving.canary import Rollout, Shadowing
from rayline.serving.following import Following
from rayline.serving.metrics import ModelMetrics
from rayline.serving.settings import ServeArgs
from rayline.store import ModelRegistry, RegistryError

logger = logging.getLogger("ray.serve")
MAX_SHADOW_CALLS = 64
"""Shadow calls in flight per replica; past it the shadow skips requests (counted)."""

Versions = tuple[int | None, int | None]
"""(serving, canary) version numbers of a model; None where none is held."""


class Held:
    """One model's versions in this replica: `serving` follows `ref`, `canary` (when a
    `canary_alias` is given) follows that alias, which may be unset."""

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        load: Callable[[ModelRegistry, str, int], Any],
        ref: str,
        poll_s: float,
        canary_alias: str | None = None,
    ):
        self.name = name
        self.serving = Following(registry, name, load, ref, poll_s)
        self.canary = (
            Following(registry, name, load, canary_alias, poll_s, optional=True)
            if canary_alias
            else None
        )

    def followings(self) -> list[Following]:
        return [f for f in (self.serving, self.canary) if f is not None]

    def predictor(self, role: str) -> Any | None:
        """The loaded version that plays `role` ("serving" or "canary"), or None."""
        following = self.canary if role == "canary" else self.serving
        return following.current if following is not None else None

    def versions(self) -> Versions:
        serving, canary = self.predictor("serving"), self.predictor("canary")
        return (
            serving.version.version if serving is not None else None,
            canary.version.version if canary is not None else None,
        )

    def status(self) -> tuple[dict | None, dict | None, list[dict]]:
        """(the serving version as /models lists it, the canary's, the versions refused)."""
        serving, canary = self.predictor("serving"), self.predictor("canary")
        return (
            describe(serving.version) if serving is not None else None,
            describe(canary.version) if canary is not None else None,
            [problem for f in self.followings() for problem in f.problems()],
        )


async def load_and_follow(
    helds: Iterable[Held], previous: list[asyncio.Task]
) -> list[asyncio.Task]:
    """Every version `helds` follow loaded (in threads, at once), then the `previous`
    followers stopped and a follower task started for each: the new tasks. A replica
    answers with its old versions until the new ones are loaded."""
    followings = [f for held in helds for f in held.followings()]
    await asyncio.gather(*(asyncio.to_thread(f.load) for f in followings))
    for task in previous:
        task.cancel()
    loop = asyncio.get_running_loop()
    return [loop.create_task(f.follow()) for f in followings]


class Traffic:
    """The canary split, the canary's judging and the shadows of every model a gateway
    replica serves (ServeArgs.canary_fraction, .canary, .shadow). `versions(name)` says
    which (serving, canary) versions answer the model now, wherever it is held."""

    def __init__(
        self, settings: ServeArgs, versions: Callable[[str], Versions], metrics: ModelMetrics
    ):
        self.store_uri, self.canary_args = settings.store_uri, settings.canary
        self.versions, self.metrics = versions, metrics
        self.rollouts = {
            name: Rollout(name, fraction, settings.canary)
            for name, fraction in settings.canary_fraction.items()
            if fraction > 0
        }
        self.shadows = {name: Shadowing() for name in settings.shadow}
        self.shadow_calls: set[asyncio.Task] = set()
        self.background: set[asyncio.Task] = set()

    def with_canary(self) -> list[str]:
        """The models whose canary alias a replica must hold (split or shadowed)."""
        return [*self.rollouts, *self.shadows]

    def role_for(self, name: str, key: str | None, wanted: int | None = None) -> str:
        """Which of the model's versions answers this request, "serving" or "canary":
        the `wanted` version (an Open Inference Protocol route's; NotFound when it is not
        served now), else the canary split's draw (by a hash of `key` where the route
        has one): a share only while the canary differs from the serving version and
        was not rolled back here."""
        if wanted is None:
            rollout = self.rollouts.get(name)
            if rollout is None:
                return "serving"
            serving, canary = self.versions(name)
            takes = canary != serving and rollout.takes_canary(canary, key)
            return "canary" if takes else "serving"
        serving, canary = self.versions(name)
        if wanted in (serving, canary):
            return "serving" if wanted == serving else "canary"
        raise NotFound(
            f"{name} has no version {wanted} served (serving: {serving}, canary: {canary})"
        )

    def canary_share(self, name: str) -> float:
        """The share the model's canary takes now: 0 while it has none that is live (the
        alias unset, at the serving version, or rolled back here)."""
        serving, canary = self.versions(name)
        rollout = self.rollouts[name]
        if canary is None or canary == serving or canary in rollout.rolled_back:
            return 0.0
        return rollout.fraction

    def judge(self, answered: tuple, status: int, latency_s: float) -> None:
        """After each model route's answer: the version's metrics, and the canary's
        window, judged (a verdict rolls it back)."""
        name, role, version = answered
        self.metrics.answered(name, version, role, status, latency_s)
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
        self.rollouts[name].rolled_back[version] = verdict["reason"]
        logger.warning("rayline: canary %s v%s rolled back: %s", name, version, verdict["reason"])
        self.metrics.rolled_back(name, version)

        def record() -> None:
            try:
                registry = ModelRegistry(self.store_uri, create=False)
                registry.roll_back(
                    name, self.canary_args.alias, version, serving=serving, **verdict
                )
            except (RegistryError, OSError) as exc:  # traffic is stopped here either way
                logger.warning("rayline: rollback of %s v%s not recorded: %s", name, version, exc)

        self._in_background(asyncio.to_thread(record), self.background)

    def shadow(
        self,
        name: str,
        answer: Any,
        canary_answer: Callable[[], Awaitable[tuple[int, Any] | None]],
        agreement: Callable[[Any, Any], dict[str, float]],
    ) -> None:
        """For a shadowed model with a canary held: `canary_answer()` ((version, answer)
        or None) in the background, never awaited here, compared with the serving
        `answer` by `agreement`. At most MAX_SHADOW_CALLS run at once; past that a call
        is skipped, counted."""
        shadowing = self.shadows.get(name)
        if shadowing is None or self.versions(name)[1] is None:
            return
        if len(self.shadow_calls) >= MAX_SHADOW_CALLS:
            shadowing.skipped += 1
            return
        compared = self._compare(name, shadowing, answer, canary_answer, agreement)
        self._in_background(compared, self.shadow_calls)

    async def _compare(self, name, shadowing, answer, canary_answer, agreement) -> None:
        try:
            theirs = await canary_answer()
            if theirs is None:
                return
            if isinstance(answer, bytes):  # a batched route's encoded answer
                answer = json.loads(answer)
            measures = agreement(answer, theirs[1])
        except Exception as exc:  # the canary's failure is a figure, never the client's
            shadowing.errors += 1
            shadowing.last_error = f"{type(exc).__name__}: {exc}"
            return
        shadowing.add(measures)
        self.metrics.shadowed(name, theirs[0], measures)

    @staticmethod
    def _in_background(work: Awaitable, tasks: set[asyncio.Task]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def publish(self) -> None:
        """Each canary's share and rollback times as gauges (set again every few seconds:
        Ray's metrics agent stops exporting a gauge that nobody sets for a while)."""
        for name in self.rollouts:
            self.metrics.canary(name, self.canary_share(name))
        self.metrics.publish_rollback_times()

    def listed(self, name: str, serving: dict, canary: dict | None) -> list[dict]:
        """The model's entries in /models: the serving version with its share of this
        replica's answers, its shadow, its canary with the canary's share."""
        rollout, shadowing = self.rollouts.get(name), self.shadows.get(name)
        share = rollout.share("serving") if rollout and rollout.answered else 1.0
        entries = [{**serving, "role": "serving", "share": share}]
        if canary is not None and shadowing is not None:
            entries.append({**canary, "role": "shadow", **shadowing.status()})
        if canary is not None and rollout and canary["version"] != serving["version"]:
            entries.append(
                {
                    **canary,
                    "role": "canary",
                    "share": rollout.share("canary"),
                    "canary_fraction": rollout.fraction,
                    "rolled_back": rollout.rolled_back.get(canary["version"]),
                }
            )
        return entries

    def rolled_back(self) -> list[dict]:
        """The canaries this replica rolled back, with why."""
        return [
            {"name": name, "version": version, "reason": reason}
            for name, rollout in self.rollouts.items()
            for version, reason in rollout.rolled_back.items()
        ]
