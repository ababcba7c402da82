"""Following a model alias as it moves: the version it points at, loaded without
dropping a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rayline.memory import release_freed_memory
from rayline.store import ModelRegistry, RegistryError

logger = logging.getLogger("ray.serve")


class Following:
    """The loaded version of one model alias. `follow` (a background task of the replica)
    checks every `poll_s` seconds where the alias points and loads a new version in a
    worker thread; the swap is one assignment, so no request waits for a load or sees a
    half-loaded model. A version that cannot be loaded is refused once, logged once with
    its reason, and the version before it keeps answering. An `optional` alias (a
    canary) may be unset: then nothing is held, and its removal drops what was."""

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        loader: Callable[[ModelRegistry, str, int], Any],
        ref: str,
        poll_s: float,
        optional: bool = False,
    ):
        self.registry, self.name, self.ref, self.poll_s = registry, name, ref, poll_s
        self.loader, self.optional = loader, optional
        self.current = None
        self.refused: dict[int, str] = {}
        """Version -> why it is not served."""

    def load(self) -> None:
        """Load the version the alias points at now (at start, in a worker thread)."""
        version = self._where_or_refuse()
        if version is not None:
            self._load(version)

    def _where_or_refuse(self) -> int | None:
        """`_where`, or None with the reason listed as a problem (version -1) while the
        alias cannot be read; a readable alias clears it. A store file can be anything
        (rayline.store turns what it finds into RegistryError): nothing that reading it
        raises may end the follower, or the model stays on its version for good."""
        try:
            version = self._where()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            if self.refused.get(-1) != reason:
                self.refused.pop(-1, None)
                self._refuse(-1, reason)
            return None
        if self.refused.pop(-1, None) is not None:
            logger.warning("rayline: %s's alias %r can be read again", self.name, self.ref)
        return version

    def _where(self) -> int | None:
        """The version the alias points at now; None for an optional alias not set or not
        readable (as `ModelRegistry.aliases` leaves such an alias out; reading this one
        alone, not every alias of the model, on every poll)."""
        try:
            return self.registry.resolve(self.name, self.ref)
        except RegistryError:
            if self.optional:
                return None
            raise

    def _load(self, version: int) -> None:
        try:
            self.current = self.loader(self.registry, self.name, version)
        except Exception as exc:  # a bad artifact must never take the replica down
            self._refuse(version, f"{type(exc).__name__}: {exc}")
        release_freed_memory()  # the version before, and what loading it left

    def _refuse(self, version: int, reason: str) -> None:
        if version not in self.refused:
            self.refused[version] = reason
            logger.warning("rayline: not serving %s v%s: %s", self.name, version, reason)

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            version = await asyncio.to_thread(self._where_or_refuse)
            if -1 in self.refused:  # the alias cannot be read: keep what is held until it can
                continue
            if version is None:
                if self.current is not None:
                    self.current = None
                    await asyncio.to_thread(release_freed_memory)
                continue
            serving = self.current.version.version if self.current else None
            if version != serving and version not in self.refused:
                await asyncio.to_thread(self._load, version)

    def problems(self) -> list[dict]:
        """Why versions are not served, as answers over HTTP say it: the store's location
        left out (the replica's log has it)."""
        return [
            {
                "name": self.name,
                "version": version if version > 0 else None,
                "reason": self.registry.redact(reason),
            }
            for version, reason in self.refused.items()
        ]
