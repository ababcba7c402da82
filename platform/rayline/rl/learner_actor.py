"""The learner's Ray actor: a `rayline.rl.learner.Learner` fed by the replay shards,
the next batches in flight while it computes on the current ones. torch is imported in
the actor's own process only: the trial that launches it, like the collectors, never
needs it (2.6 CPU-seconds of start-up each)."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import ray

from rayline.rl.config import LearnerConfig, NetworkSpec
from rayline.rl.replay import PendingSample, ShardedReplay
from rayline.startup import HEALTH_GROUP, ActorStart, exit_quietly_on_sigterm


class Learned(NamedTuple):
    """What one `LearnerActor.train` call did."""

    updates: int
    learner_updates: int
    """The learner's total after the call."""
    target_syncs: int
    loss: float
    train_s: float
    replay_wait_s: float


# No restarts by Ray: a restarted learner would silently start from scratch. The run loop
# rebuilds a dead learner itself from the state it keeps (rayline.rl.fleet.LearnerKeeper).
# No task events: tens of calls a second filled the GCS's task table (docs/dqn.md, "Held for hours").
@ray.remote(max_restarts=0, enable_task_events=False, concurrency_groups=HEALTH_GROUP)
class LearnerActor:
    """A Learner fed by the replay shards, batches for the next call already in flight."""

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answered while a call runs (rayline.startup.HEALTH_GROUP); no answer: hung."""
        return True

    def __init__(
        self,
        shards: list[ray.actor.ActorHandle],
        shard_capacity: int,
        network: NetworkSpec,
        settings: LearnerConfig,
        *,
        beta: float,
        seed: int = 0,
        threads: int = 1,
    ):
        self.start = ActorStart()
        exit_quietly_on_sigterm()
        import torch  # in this process only: the trial that launches it never needs it

        from rayline.rl.learner import Learner

        torch.set_num_threads(threads)  # from the CPUs the learner reserved
        self.learner = Learner(network, settings, seed)
        self.replay = ShardedReplay(shards, shard_capacity, seed)
        self.batch_size, self.beta = settings.batch_size, beta
        self.batches_per_fetch = settings.batches_per_fetch
        self.next_batches: PendingSample | None = None
        self.pending_priorities: list[ray.ObjectRef] = []
        self.start.constructed()

    def started(self) -> tuple[float, float, float]:
        return self.start.times()

    def _fetch(self) -> PendingSample:
        return self.replay.request(self.batches_per_fetch, self.batch_size)

    def use_replay(self, shards: list[ray.actor.ActorHandle]) -> None:
        """Sample from these shards (after one was rebuilt because it died)."""
        self.replay.use(shards)
        self.next_batches, self.pending_priorities = None, []

    @ray.method(num_returns=2)
    def train(self, num_updates: int) -> tuple[Learned, dict]:
        """Run `num_updates` updates (rounded up to whole fetches); return the stats and
        the fresh policy weights, as two results: the caller owns both, so the weights
        outlive this actor."""
        started = time.perf_counter()
        losses, wait_s = [], 0.0
        done = 0
        while done < num_updates:
            if self.next_batches is None:
                self.next_batches = self._fetch()
            t0 = time.perf_counter()
            stacked = self.replay.collect(self.next_batches, self.beta)
            wait_s += time.perf_counter() - t0
            self.next_batches = self._fetch()  # in flight while we compute
            fetch_losses, td_all = self.learner.update_stacked(stacked)
            losses.extend(fetch_losses)
            ray.get(self.pending_priorities)  # at most one priority update in flight
            self.pending_priorities = self.replay.update_priorities(stacked.indices, td_all)
            done += self.batches_per_fetch
        learned = Learned(
            updates=done,
            learner_updates=self.learner.learner_updates,
            target_syncs=self.learner.target_syncs,
            loss=float(np.mean(losses)),
            train_s=time.perf_counter() - started,
            replay_wait_s=wait_s,
        )
        return learned, self.learner.weights()

    def weights(self) -> dict:
        return self.learner.weights()

    def state_bytes(self) -> bytes:
        return self.learner.state_bytes()

    def policy_bytes(self, weights: dict[str, np.ndarray]) -> bytes:
        """Numpy weights (as broadcast) as torch state_dict bytes, the checkpoint's
        evaluated policy: made here, so that the trial's process never imports torch
        (at its first checkpoint it grew by 385 MB for the rest of the run)."""
        import torch

        from rayline.rl.learner import state_to_bytes

        return state_to_bytes({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})

    def policy_weights(self, data: bytes) -> dict[str, np.ndarray]:
        """`policy_bytes`'s inverse, for a resumed run's kept evaluation: made here for
        the same reason (the trial's process never imports torch)."""
        from rayline.rl.learner import state_from_bytes

        return {k: v.numpy() for k, v in state_from_bytes(data).items()}

    def load_state_bytes(self, data: bytes) -> int:
        self.learner.load_state_bytes(data)
        return self.learner.learner_updates
