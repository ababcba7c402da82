"""The learner's view of several replay shards as one prioritised buffer."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import ray

from rayline.rl.replay.batches import SampledBatch, ShardSample, Transitions
from rayline.rl.replay.samplers import importance_weights, stratified_points


class PendingSample(NamedTuple):
    """Batches asked of the shards, not yet arrived."""

    answers: list
    owners: np.ndarray
    shape: tuple[int, int]
    mass: float
    size: int


class ShardedReplay:
    """The learner's view of the replay shards as one prioritised buffer (see the module
    docstring). Each shard's mass comes back with its previous answer, so a draw costs one
    round trip to each shard; a transition's index is shard * shard_capacity + slot."""

    def __init__(self, shards: list, shard_capacity: int, seed: int = 0):
        self.shard_capacity = shard_capacity
        self.rng = np.random.default_rng(seed)
        self.use(shards)

    def use(self, shards: list) -> None:
        """Sample from these shards (after one was rebuilt); masses are asked afresh."""
        self.shards = list(shards)
        self.masses: list[float] | None = None
        self.sizes: list[int] = []

    def request(self, num_batches: int, batch_size: int) -> PendingSample:
        if self.masses is None:
            answers = ray.get([shard.mass.remote() for shard in self.shards])
            self.masses, self.sizes = [a[0] for a in answers], [a[1] for a in answers]
        mass, size = float(sum(self.masses)), int(sum(self.sizes))
        if mass <= 0:
            self.masses = None
            raise ValueError("cannot sample from an empty replay")
        points = np.concatenate(
            [stratified_points(self.rng, batch_size, mass) for _ in range(num_batches)]
        )
        points = np.minimum(points, mass * (1 - 1e-12))
        bounds = np.cumsum([0.0, *self.masses])
        owners = np.searchsorted(bounds, points, side="right") - 1
        owners = np.clip(owners, 0, len(self.shards) - 1)
        answers = [
            shard.sample_at.remote(points[owners == index] - bounds[index])
            for index, shard in enumerate(self.shards)
        ]
        return PendingSample(answers, owners, (num_batches, batch_size), mass, size)

    def collect(self, pending: PendingSample, beta: float) -> SampledBatch:
        """The batches of `pending`, stacked on axis 0, with importance weights from the
        mass and size the draw used."""
        answers: list[ShardSample] = ray.get(pending.answers)
        self.masses = [answer.mass for answer in answers]
        self.sizes = [answer.size for answer in answers]
        count = len(pending.owners)
        fields = []
        for field in range(len(Transitions._fields)):
            first = answers[0].transitions[field]
            out = np.empty((count, *first.shape[1:]), dtype=first.dtype)
            for index, answer in enumerate(answers):
                out[pending.owners == index] = answer.transitions[field]
            fields.append(out)
        priorities = np.empty(count)
        indices = np.empty(count, dtype=np.int64)
        for index, answer in enumerate(answers):
            mine = pending.owners == index
            priorities[mine] = answer.priorities
            indices[mine] = index * self.shard_capacity + answer.slots
        shape = pending.shape
        weights = np.stack(
            [
                importance_weights(row, pending.mass, pending.size, beta)
                for row in priorities.reshape(shape)
            ]
        )
        return SampledBatch(
            *(f.reshape(*shape, *f.shape[1:]) for f in fields), weights, indices.reshape(shape)
        )

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> list:
        """Send each shard its TD errors; returns the calls in flight."""
        indices, td_errors = indices.reshape(-1), td_errors.reshape(-1)
        owners = indices // self.shard_capacity
        return [
            shard.update_priorities.remote(
                indices[owners == index] % self.shard_capacity, td_errors[owners == index]
            )
            for index, shard in enumerate(self.shards)
            if np.any(owners == index)
        ]
