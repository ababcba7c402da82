"""The replay ratio, kept: how many collector calls and learner updates may be in flight."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RateLimiter:
    """Holds collectors and learner to the replay ratio (learner updates per env step),
    so a run learns the same way on a slow laptop and a fast cluster. Collectors may run
    ahead by one call each; the learner waits for `learning_starts` env steps and for
    enough transitions to fill a batch. Plain arithmetic: tested without Ray."""

    ratio: float
    learning_starts: int
    warmup_transitions: int
    updates_per_call: int
    steps_per_call: int
    num_collectors: int
    steps_in_flight: int = 0

    def collector_may_start(self, env_steps: int, updates: int, replay_size: int) -> bool:
        if replay_size < self.warmup_transitions:
            # Fresh, resumed without the replay in its checkpoint, or the replay was lost: refill it.
            # Steps in flight do not count: a call on a lost node may never come back,
            # and the learner waits for this refill (each collector has one call at most).
            return True
        allowed = (
            self.learning_starts
            + (updates + self.updates_per_call) / self.ratio
            + self.steps_per_call * self.num_collectors
        )
        return env_steps + self.steps_in_flight + self.steps_per_call <= allowed

    def learner_may_start(self, env_steps: int, updates: int, replay_size: int) -> bool:
        return (
            replay_size >= self.warmup_transitions
            and updates <= (env_steps - self.learning_starts) * self.ratio
        )

    def collecting(self) -> None:
        self.steps_in_flight += self.steps_per_call

    def collected(self) -> None:
        self.steps_in_flight -= self.steps_per_call
