"""Canary rollouts in the gateway: a share of a model's requests go to the version its
`canary` alias points at, every answer names the version that gave it, and a canary
that answers worse than the serving version is rolled back.

Which version answers: by a hash of the request's key where the route has one (the
recommender's user id: a user sees one version, on every replica), otherwise at random.
Each replica judges on its own window of outcomes: both versions see the same traffic,
so a canary whose share of errors (any status >= 400: a canary that refuses rows the
serving version accepts answers 400s) or whose p99 latency is worse than the serving
version's by more than the margin is the canary's fault. A rolled-back canary gets no
more traffic in this replica at once; its alias is removed from the registry (the other
replicas follow within their poll) and the model's history records why.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random

from rayline.config import bounded, named

CANARY_HEADER = "x-rayline-model"
"""Every answer of a model route carries `X-Rayline-Model: NAME/VERSION`."""


@dataclasses.dataclass
class CanaryArgs:
    """How canaries are judged (ServeArgs.canary); the share per model is
    ServeArgs.canary_fraction."""

    alias: str = named("canary")
    """The alias whose version takes the canary's share of the requests."""
    window_requests: int = bounded(200, ge=10)
    """Outcomes per version the comparison looks back over (a sliding window)."""
    min_requests: int = bounded(50, ge=5)
    """Canary outcomes in the window before it is judged."""
    max_error_rate_delta: float = bounded(0.05, ge=0.0, le=1.0)
    """Roll back when the canary's error rate exceeds the serving version's by more."""
    max_p99_ratio: float = bounded(3.0, ge=1.0)
    """Roll back when the canary's p99 latency exceeds the serving version's times this,
    plus p99_slack_ms (judged once both windows are full: the p99 of fewer outcomes is
    their maximum, one hiccup)."""
    p99_slack_ms: float = bounded(20.0, ge=0.0)
    """Latency differences under this are never the canary's fault: on a 2 ms route one
    scheduler hiccup makes a small window's p99 3x (seen here: a healthy canary rolled
    back on 20 requests)."""


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) for `text`: the same on every replica and restart
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Window:
    """The last `size` outcomes of one version: errors (counted as they come and go, so
    a verdict on every canary answer does not sum the window) and latencies."""

    def __init__(self, size: int):
        self.errors: collections.deque[bool] = collections.deque(maxlen=size)
        self.latencies: collections.deque[float] = collections.deque(maxlen=size)
        self.error_count = 0
        self.added = 0
        self.p99_at: tuple[int, float] | None = None
        """(outcomes added when it was computed, the p99): sorted again once a twentieth
        of the window is new (10 outcomes of the default 200), not on every answer."""
        self.p99_refresh = max(1, size // 20)

    def add(self, error: bool, latency_s: float) -> None:
        if len(self.errors) == self.errors.maxlen:
            self.error_count -= self.errors[0]
        self.errors.append(error)
        self.error_count += error
        self.latencies.append(latency_s)
        self.added += 1

    def __len__(self) -> int:
        return len(self.errors)

    def error_rate(self) -> float:
        return self.error_count / len(self.errors) if self.errors else 0.0

    def p99(self) -> float:
        if self.p99_at is not None and self.added - self.p99_at[0] < self.p99_refresh:
            return self.p99_at[1]
        ordered = sorted(self.latencies)
        value = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0
        self.p99_at = (self.added, value)
        return value


class Rollout:
    """One model's split between its serving and canary versions in this replica."""

    def __init__(self, name: str, fraction: float, args: CanaryArgs):
        self.name, self.fraction, self.args = name, fraction, args
        self.windows: dict[int, Window] = {}
        self.answered: collections.Counter[tuple[str, int]] = collections.Counter()
        """(role, version) -> answers given by this replica."""
        self.rolled_back: dict[int, str] = {}
        """Canary version -> why it gets no more traffic."""

    def takes_canary(self, canary_version: int | None, key: str | None) -> bool:
        if canary_version is None or canary_version in self.rolled_back or self.fraction <= 0:
            return False
        draw = random.random() if key is None else unit_hash(f"{self.name}\0{key}")
        return draw < self.fraction

    def record(self, role: str, version: int, error: bool, latency_s: float) -> None:
        self.answered[role, version] += 1
        if version not in self.windows:
            self.windows[version] = Window(self.args.window_requests)
        self.windows[version].add(error, latency_s)

    def verdict(self, serving: int | None, canary: int) -> dict | None:
        """Why the canary must be rolled back, with the windows' figures; None while it
        holds (or has too few outcomes to judge)."""
        if canary in self.rolled_back:
            return None
        ours = self.windows.get(canary)
        theirs = self.windows.get(serving) if serving is not None else None
        if ours is None or len(ours) < self.args.min_requests:
            return None
        full = self.args.window_requests
        judge_p99 = theirs is not None and len(theirs) >= full and len(ours) >= full
        canary_rate = round(ours.error_rate(), 4)
        serving_rate = round(theirs.error_rate(), 4) if theirs else 0.0
        errors_over = canary_rate - serving_rate > self.args.max_error_rate_delta
        # The common case is decided without building the figures: this runs on every
        # canary answer.
        limit_s = (
            self.args.max_p99_ratio * theirs.p99() + self.args.p99_slack_ms / 1000
            if judge_p99
            else None
        )
        slow = limit_s is not None and ours.p99() > limit_s
        if not errors_over and not slow:
            return None
        figures = {
            "canary_requests": len(ours),
            "canary_error_rate": canary_rate,
            "serving_requests": len(theirs) if theirs else 0,
            "serving_error_rate": serving_rate,
            "canary_p99_ms": round(ours.p99() * 1000, 2),
            "serving_p99_ms": round(theirs.p99() * 1000, 2) if theirs else None,
        }
        if errors_over:
            reason = (
                f"error rate {canary_rate:.1%} against the serving version's "
                f"{serving_rate:.1%} over the last {len(ours)} requests (margin "
                f"{self.args.max_error_rate_delta:.1%})"
            )
        else:
            ratio = ours.p99() / max(theirs.p99(), 1e-6)
            reason = (
                f"p99 latency {figures['canary_p99_ms']:g} ms against the serving "
                f"version's {figures['serving_p99_ms']:g} ms ({ratio:.1f}x, margin "
                f"{self.args.max_p99_ratio:g}x + {self.args.p99_slack_ms:g} ms)"
            )
        return {"reason": reason, **figures}

    def share(self, role: str) -> float:
        """The share of this replica's answers for the model that `role` gave."""
        total = sum(self.answered.values())
        mine = sum(n for (r, _), n in self.answered.items() if r == role)
        return mine / total if total else 0.0


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
