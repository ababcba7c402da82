"""Experience replay: preallocated numpy storage composed with a uniform or prioritised
sampler, plus the thin Ray actor that shares one buffer (one shard) between collectors
and learner.

Prioritised replay follows Schaul et al. 2016 (https://arxiv.org/abs/1511.05952):
P(i) = p_i^alpha / sum_k p_k^alpha, importance weights (N * P(i))^-beta normalised by
the batch maximum, new transitions at the highest priority seen so far.

Sharding (Horgan et al. 2018's Ape-X at scale): the learner sees several buffers as one.
It knows each shard's probability mass (its sum of p^alpha, or its size when uniform),
draws stratified points over the concatenated masses, and sends each shard the points
that fall in it; the shard answers with the slots its sum tree finds. A batch drawn so
is distributed exactly as one drawn from a single buffer holding every shard's contents,
and so are its importance weights, which the learner computes from the global mass.

Pixels (`FrameStorage`): a stack of 4 frames is 4 indices into a store of single uint8
frames, and next_obs shares the frames of obs, so a transition costs about one frame.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from rayline.fs import atomic_write, filesystem


class Transitions(NamedTuple):
    """A batch of n-step transitions; see rayline.rl.dqn for what `discounts` holds."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray


class FrameTransitions(NamedTuple):
    """Transitions of stacked-frame observations sent without copies: `frames` holds each
    distinct frame of the batch once, and `obs`/`next_obs` are (B, stack) int32 indices
    into it. A batch is self-contained: it carries every frame it refers to."""

    frames: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray


class SampledBatch(NamedTuple):
    """Transitions drawn from the replay with their slots and importance weights."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray
    weights: np.ndarray
    indices: np.ndarray


class ShardSample(NamedTuple):
    """One shard's answer to `sample_at`: the transitions at the points it was sent,
    their slots and p^alpha, and the shard's mass and size after the draw (the learner
    uses them to split its next draw)."""

    transitions: Transitions
    slots: np.ndarray
    priorities: np.ndarray
    mass: float
    size: int


class SumTree:
    """Binary tree over `capacity` leaves whose inner nodes hold the sums of their
    children: prefix-sum lookup and update in O(log n), vectorised over batches."""

    def __init__(self, capacity: int):
        self.leaves = 1 << max(0, (capacity - 1).bit_length())
        self.nodes = np.zeros(2 * self.leaves, dtype=np.float64)  # node 1 is the root

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.nodes[indices + self.leaves]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        if len(indices) == 0:
            return
        nodes = np.unique(np.asarray(indices) + self.leaves)
        self.nodes[np.asarray(indices) + self.leaves] = values
        while nodes[0] > 1:
            nodes = np.unique(nodes // 2)
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each value v, the leaf i with sum(leaves[:i]) <= v < sum(leaves[:i+1])."""
        nodes = np.ones(len(prefix_sums), dtype=np.int64)
        values = np.array(prefix_sums, dtype=np.float64)
        while nodes[0] < self.leaves:
            left = 2 * nodes
            left_sums = self.nodes[left]
            go_right = values >= left_sums
            values = np.where(go_right, values - left_sums, values)
            nodes = np.where(go_right, left + 1, left)
        return nodes - self.leaves


def check_memory(needed: int, what: str) -> None:
    """Fail fast, before allocating, when `needed` bytes cannot fit in this machine."""
    available = _physical_memory_bytes()
    if needed > 0.8 * available:
        raise MemoryError(
            f"{what} needs {needed / 2**30:.1f} GiB; this machine has {available / 2**30:.1f} GiB"
        )


class RingStorage:
    """Transitions in preallocated arrays, written round a ring: slot = added % capacity.
    Fails fast, in the constructor, when the arrays cannot fit in this machine."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype | str):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs_shape = tuple(obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.bytes_per_transition = (
            2 * int(np.prod(self.obs_shape)) * self.obs_dtype.itemsize + 16 + SAMPLER_BYTES
        )
        check_memory(
            capacity * self.bytes_per_transition,
            f"replay of {capacity:,} transitions of {self.obs_shape} {self.obs_dtype}",
        )
        self.obs = np.zeros((capacity, *self.obs_shape), dtype=self.obs_dtype)
        self.next_obs = np.zeros((capacity, *self.obs_shape), dtype=self.obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.added = 0
        """Transitions ever added; the write position is added % capacity."""

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    @property
    def oldest(self) -> int:
        """Number (in order of adding) of the oldest transition held."""
        return self.added - len(self)

    @property
    def slots_in_use(self) -> int:
        return len(self)

    def add(self, batch: Transitions) -> tuple[np.ndarray, np.ndarray]:
        """Store `batch` (only its newest `capacity` if larger); returns the slots written
        and the slots whose transitions were dropped without being overwritten (none)."""
        count = len(batch.actions)
        if count > self.capacity:
            batch = Transitions(*(field[-self.capacity :] for field in batch))
            self.added += count - self.capacity
            count = self.capacity
        slots = (self.added + np.arange(count)) % self.capacity
        self.obs[slots] = batch.obs
        self.actions[slots] = batch.actions
        self.rewards[slots] = batch.rewards
        self.next_obs[slots] = batch.next_obs
        self.discounts[slots] = batch.discounts
        self.added += count
        return slots, np.empty(0, dtype=np.int64)

    def gather(self, indices: np.ndarray) -> Transitions:
        return Transitions(
            self.obs[indices],
            self.actions[indices],
            self.rewards[indices],
            self.next_obs[indices],
            self.discounts[indices],
        )

    def memory(self) -> dict:
        return {"bytes_per_transition": self.bytes_per_transition}

    def check_valid(self) -> None:
        size = len(self)
        assert 0 <= size <= self.capacity, f"size {size} outside [0, {self.capacity}]"
        _check_transition_values(self.rewards[:size], self.discounts[:size])

    def state_dict(self) -> dict:
        size = len(self)
        return {
            "obs": self.obs[:size],
            "actions": self.actions[:size],
            "rewards": self.rewards[:size],
            "next_obs": self.next_obs[:size],
            "discounts": self.discounts[:size],
            "added": self.added,
        }

    def load_state_dict(self, state: dict) -> None:
        size = len(state["actions"])
        if size > self.capacity:
            raise ValueError(f"state holds {size} transitions; capacity is {self.capacity}")
        for name in ("obs", "actions", "rewards", "next_obs", "discounts"):
            getattr(self, name)[:size] = state[name]
        self.added = int(state["added"])

    def columns(self, state: dict) -> tuple[dict, dict]:
        """Parquet columns and metadata for `state`."""
        flat = int(np.prod(self.obs_shape))
        columns = {
            "obs": pa.FixedSizeListArray.from_arrays(state["obs"].reshape(-1), flat),
            "next_obs": pa.FixedSizeListArray.from_arrays(state["next_obs"].reshape(-1), flat),
            "action": state["actions"],
            "reward": state["rewards"],
            "discount": state["discounts"],
        }
        return columns, {"added": state["added"]}

    def state_from_table(self, table: pa.Table, meta: dict) -> dict:
        return {
            "obs": _fixed_list_column(table, "obs", self.obs_shape),
            "next_obs": _fixed_list_column(table, "next_obs", self.obs_shape),
            "actions": table.column("action").to_numpy(),
            "rewards": table.column("reward").to_numpy(),
            "discounts": table.column("discount").to_numpy(),
            "added": meta["added"],
        }


class FrameStorage:
    """Stacked-frame observations (stack, H, W) stored as single frames, each once.

    Two rings: frames, and transitions that name their frames by frame number (frames
    ever added before them), so obs and next_obs of one transition, and the stacks of
    neighbouring transitions, share frames. A batch's frames are written with its
    transitions; when the frame ring overwrites the first frame of a batch, the whole
    batch is dropped (its slots are reported so the sampler stops drawing them). The frame
    ring holds `frames_per_transition` x capacity frames, enough that in normal use the
    transition ring is what limits the buffer.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | str,
        frames_per_transition: float = 1.25,
    ):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        if len(obs_shape) != 3:
            raise ValueError(f"frame storage needs (stack, H, W) observations, got {obs_shape}")
        self.capacity = capacity
        self.obs_shape = tuple(obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.stack, self.frame_shape = obs_shape[0], tuple(obs_shape[1:])
        self.frame_capacity = max(int(capacity * frames_per_transition), 2 * self.stack)
        self.frame_bytes = int(np.prod(self.frame_shape)) * self.obs_dtype.itemsize
        per_transition = 2 * self.stack * 8 + 8 + 16 + SAMPLER_BYTES
        check_memory(
            self.frame_capacity * self.frame_bytes + capacity * per_transition,
            f"replay of {capacity:,} transitions of {self.obs_shape} {self.obs_dtype} "
            f"({self.frame_capacity:,} frames)",
        )
        self.per_transition_bytes = per_transition
        self.frames = np.zeros((self.frame_capacity, *self.frame_shape), dtype=self.obs_dtype)
        self.obs_frames = np.zeros((capacity, self.stack), dtype=np.int64)
        self.next_frames = np.zeros((capacity, self.stack), dtype=np.int64)
        self.batch_first_frame = np.zeros(capacity, dtype=np.int64)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.added = 0
        """Transitions ever added; the write position is added % capacity."""
        self.frames_added = 0
        self.oldest = 0
        """Number of the oldest transition still held; held are oldest .. added - 1."""

    def __len__(self) -> int:
        return self.added - self.oldest

    @property
    def slots_in_use(self) -> int:
        return min(self.added, self.capacity)

    def add(self, batch: FrameTransitions) -> tuple[np.ndarray, np.ndarray]:
        """Store `batch`; returns the slots written and the slots dropped because their
        frames were overwritten."""
        count, frame_count = len(batch.actions), len(batch.frames)
        if count > self.capacity or frame_count > self.frame_capacity:
            raise ValueError(
                f"a batch of {count:,} transitions and {frame_count:,} frames does not fit "
                f"a replay of {self.capacity:,} transitions and {self.frame_capacity:,} frames"
            )
        if batch.frames.shape[1:] != self.frame_shape:
            raise ValueError(f"frames of {batch.frames.shape[1:]}, expected {self.frame_shape}")
        first = self.frames_added
        numbers = first + np.arange(frame_count)
        self.frames[numbers % self.frame_capacity] = batch.frames
        self.frames_added += frame_count
        dropped = self._drop_overwritten(self.frames_added - self.frame_capacity)
        slots = (self.added + np.arange(count)) % self.capacity
        self.obs_frames[slots] = numbers[batch.obs]
        self.next_frames[slots] = numbers[batch.next_obs]
        self.batch_first_frame[slots] = first
        self.actions[slots] = batch.actions
        self.rewards[slots] = batch.rewards
        self.discounts[slots] = batch.discounts
        self.added += count
        self.oldest = max(self.oldest, self.added - self.capacity)
        return slots, dropped

    def _drop_overwritten(self, first_frame_held: int) -> np.ndarray:
        """Advance `oldest` past every transition whose batch lost a frame; batches are
        in order, so their first frames never decrease along the ring."""
        start = self.oldest
        while self.oldest < self.added:
            window = self.oldest + np.arange(min(self.added - self.oldest, 4096))
            firsts = self.batch_first_frame[window % self.capacity]
            lost = int(np.searchsorted(firsts, first_frame_held, side="left"))
            self.oldest += lost
            if lost < len(window):
                break
        return np.arange(start, self.oldest) % self.capacity

    def gather(self, indices: np.ndarray) -> Transitions:
        return Transitions(
            self.frames[self.obs_frames[indices] % self.frame_capacity],
            self.actions[indices],
            self.rewards[indices],
            self.frames[self.next_frames[indices] % self.frame_capacity],
            self.discounts[indices],
        )

    def memory(self) -> dict:
        """Bytes per held transition: its share of the frames they use, plus its own."""
        held = len(self)
        if held == 0:
            return {"bytes_per_transition": None, "frames_per_transition": None}
        first = int(self.batch_first_frame[self.oldest % self.capacity])
        frames_used = self.frames_added - first
        return {
            "bytes_per_transition": (frames_used * self.frame_bytes) / held
            + self.per_transition_bytes,
            "frames_per_transition": frames_used / held,
            "frame_bytes": self.frame_bytes,
        }

    def check_valid(self) -> None:
        size = len(self)
        assert 0 <= size <= self.capacity, f"size {size} outside [0, {self.capacity}]"
        held = (self.oldest + np.arange(size)) % self.capacity
        first_held = self.frames_added - self.frame_capacity
        for name in ("obs_frames", "next_frames"):
            numbers = getattr(self, name)[held]
            assert np.all(numbers >= first_held) and np.all(numbers < self.frames_added), (
                f"{name}: a held transition names a frame not held"
            )
        _check_transition_values(self.rewards[held], self.discounts[held])

    def state_dict(self) -> dict:
        slots = self.slots_in_use
        return {
            "frames": self.frames[: min(self.frames_added, self.frame_capacity)],
            "obs_frames": self.obs_frames[:slots],
            "next_frames": self.next_frames[:slots],
            "batch_first_frame": self.batch_first_frame[:slots],
            "actions": self.actions[:slots],
            "rewards": self.rewards[:slots],
            "discounts": self.discounts[:slots],
            "added": self.added,
            "frames_added": self.frames_added,
            "oldest": self.oldest,
        }

    def load_state_dict(self, state: dict) -> None:
        slots, frames = len(state["actions"]), len(state["frames"])
        if slots > self.capacity or frames > self.frame_capacity:
            raise ValueError(
                f"state holds {slots} transitions and {frames} frames; capacity is "
                f"{self.capacity} and {self.frame_capacity}"
            )
        self.frames[:frames] = state["frames"]
        for name in (
            "obs_frames",
            "next_frames",
            "batch_first_frame",
            "actions",
            "rewards",
            "discounts",
        ):
            getattr(self, name)[:slots] = state[name]
        self.added, self.frames_added = int(state["added"]), int(state["frames_added"])
        self.oldest = int(state["oldest"])

    def columns(self, state: dict) -> tuple[dict, dict]:
        """Frames and transitions in one table: each column padded to the longer of the
        two (the metadata says how many rows of each are real)."""
        slots, frames = len(state["actions"]), len(state["frames"])
        rows = max(slots, frames)

        def padded(array: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
            out[: len(array)] = array
            return out

        flat = int(np.prod(self.frame_shape))
        columns = {
            "frame": pa.FixedSizeListArray.from_arrays(padded(state["frames"]).reshape(-1), flat),
            "obs_frames": pa.FixedSizeListArray.from_arrays(
                padded(state["obs_frames"]).reshape(-1), self.stack
            ),
            "next_frames": pa.FixedSizeListArray.from_arrays(
                padded(state["next_frames"]).reshape(-1), self.stack
            ),
            "batch_first_frame": padded(state["batch_first_frame"]),
            "action": padded(state["actions"]),
            "reward": padded(state["rewards"]),
            "discount": padded(state["discounts"]),
        }
        meta = {
            "added": state["added"],
            "frames_added": state["frames_added"],
            "oldest": state["oldest"],
            "slots": slots,
            "frames": frames,
        }
        return columns, meta

    def state_from_table(self, table: pa.Table, meta: dict) -> dict:
        slots, frames = meta["slots"], meta["frames"]
        return {
            "frames": _fixed_list_column(table, "frame", self.frame_shape)[:frames],
            "obs_frames": _fixed_list_column(table, "obs_frames", (self.stack,))[:slots],
            "next_frames": _fixed_list_column(table, "next_frames", (self.stack,))[:slots],
            "batch_first_frame": table.column("batch_first_frame").to_numpy()[:slots],
            "actions": table.column("action").to_numpy()[:slots],
            "rewards": table.column("reward").to_numpy()[:slots],
            "discounts": table.column("discount").to_numpy()[:slots],
            "added": meta["added"],
            "frames_added": meta["frames_added"],
            "oldest": meta["oldest"],
        }


SAMPLER_BYTES = 16
"""Sum-tree bytes per slot (a leaf and, on average, an inner node of float64)."""


def _check_transition_values(rewards: np.ndarray, discounts: np.ndarray) -> None:
    assert np.all(np.isfinite(rewards)), "non-finite reward stored"
    assert np.all((discounts >= 0) & (discounts <= 1)), "discount outside [0, 1]"


def _fixed_list_column(table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    values = table.column(name).combine_chunks().flatten().to_numpy()
    return values.reshape(-1, *shape)


class UniformSampler:
    """Every held transition equally likely: a point v in [0, size) is the transition
    floor(v) places after the oldest."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def added(self, slots: np.ndarray) -> None:
        pass

    def dropped(self, slots: np.ndarray) -> None:
        pass

    def mass(self, size: int) -> float:
        return float(size)

    def find(self, points: np.ndarray, size: int, oldest: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.clip(np.floor(points).astype(np.int64), 0, size - 1)
        return (oldest + offsets) % self.capacity, np.ones(len(points))

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        pass

    def check_valid(self, held: np.ndarray) -> None:
        pass

    def state_dict(self, slots: int) -> dict:
        return {}

    def load_state_dict(self, state: dict, slots: int) -> None:
        pass


class PrioritisedSampler:
    """Proportional prioritisation on a sum tree: P(i) = p_i^alpha / sum p^alpha, new
    transitions at the highest priority seen, dropped ones at zero."""

    def __init__(self, capacity: int, alpha: float, priority_eps: float):
        self.capacity = capacity
        self.alpha, self.priority_eps = alpha, priority_eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def added(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.full(len(slots), self.max_priority**self.alpha))

    def dropped(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.zeros(len(slots)))

    def mass(self, size: int) -> float:
        return self.tree.total

    def find(self, points: np.ndarray, size: int, oldest: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.tree.total
        slots = self.tree.find(np.clip(points, 0.0, total * (1 - 1e-12)))
        priorities = self.tree.get(slots)
        lost = priorities <= 0  # a point on the very edge of the mass, by rounding
        if lost.any():
            newest = (oldest + size - 1) % self.capacity
            slots[lost], priorities[lost] = newest, self.tree.get(np.array([newest]))[0]
        return slots, priorities

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.priority_eps
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priority update with non-finite TD errors")
        indices = np.asarray(indices)
        held = self.tree.get(indices) > 0  # a transition dropped since it was drawn stays out
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(indices[held], priorities[held] ** self.alpha)

    def check_valid(self, held: np.ndarray) -> None:
        leaves = self.tree.nodes[self.tree.leaves :]
        is_held = np.zeros(len(leaves), dtype=bool)
        is_held[held] = True
        assert np.all(leaves[is_held] > 0), "stored transition with zero priority"
        assert np.all(leaves[~is_held] == 0), "empty slot with non-zero priority"
        inner = np.arange(1, self.tree.leaves)
        sums = self.tree.nodes[2 * inner] + self.tree.nodes[2 * inner + 1]
        assert np.allclose(self.tree.nodes[inner], sums, rtol=1e-9, atol=1e-9), (
            "sum tree inconsistent"
        )

    def state_dict(self, slots: int) -> dict:
        return {
            "max_priority": self.max_priority,
            "priorities": self.tree.get(np.arange(slots)) ** (1.0 / self.alpha),
        }

    def load_state_dict(self, state: dict, slots: int) -> None:
        self.max_priority = float(state.get("max_priority", 1.0))
        self.tree = SumTree(self.capacity)
        if slots:
            priorities = state.get("priorities", np.full(slots, self.max_priority))
            self.tree.set(np.arange(slots), np.asarray(priorities) ** self.alpha)


def stratified_points(rng: np.random.Generator, count: int, mass: float) -> np.ndarray:
    """One uniform point in each of `count` equal slices of [0, mass)."""
    return (np.arange(count) + rng.random(count)) * (mass / count)


def importance_weights(priorities: np.ndarray, mass: float, size: int, beta: float) -> np.ndarray:
    """(N P(i))^-beta with P(i) = p_i / mass, normalised by the batch maximum."""
    weights = (size * priorities / mass) ** (-beta)
    return (weights / weights.max()).astype(np.float32)


class ReplayBuffer:
    """The replay: ring (or frame) storage composed with a uniform or prioritised
    sampler. Plain Python: the Ray actor below is only a shell."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | str = np.float32,
        *,
        prioritized: bool = True,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
        frames: bool = False,
        frames_per_transition: float = 1.25,
        seed: int = 0,
    ):
        self.storage: RingStorage | FrameStorage = (
            FrameStorage(capacity, obs_shape, obs_dtype, frames_per_transition)
            if frames
            else RingStorage(capacity, obs_shape, obs_dtype)
        )
        self.capacity, self.obs_shape = capacity, self.storage.obs_shape
        self.obs_dtype = self.storage.obs_dtype
        self.rng = np.random.default_rng(seed)
        self.sampler: UniformSampler | PrioritisedSampler = (
            PrioritisedSampler(capacity, alpha, priority_eps)
            if prioritized
            else UniformSampler(capacity)
        )

    def __len__(self) -> int:
        return len(self.storage)

    @property
    def added(self) -> int:
        return self.storage.added

    def add(self, batch: Transitions | FrameTransitions) -> None:
        if len(batch.actions):
            written, dropped = self.storage.add(batch)
            self.sampler.dropped(dropped)
            self.sampler.added(written)

    def mass(self) -> float:
        """The sampling mass: sum of p^alpha (prioritised) or the size (uniform)."""
        return self.sampler.mass(len(self))

    def sample_at(self, points: np.ndarray) -> ShardSample:
        """The transitions at `points` in [0, mass)."""
        size = len(self)
        if len(points) == 0:
            slots, priorities = np.empty(0, dtype=np.int64), np.empty(0)
        elif size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        else:
            slots, priorities = self.sampler.find(points, size, self.storage.oldest)
        return ShardSample(self.storage.gather(slots), slots, priorities, self.mass(), size)

    def sample(self, batch_size: int, beta: float = 0.4) -> SampledBatch:
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        mass = self.mass()
        drawn = self.sample_at(stratified_points(self.rng, batch_size, mass))
        weights = importance_weights(drawn.priorities, mass, drawn.size, beta)
        return SampledBatch(*drawn.transitions, weights, drawn.slots)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.sampler.update(indices, td_errors)

    def memory(self) -> dict:
        return self.storage.memory()

    def check_valid(self) -> None:
        """Raise AssertionError if any invariant of the storage or sampler is broken."""
        self.storage.check_valid()
        self.sampler.check_valid((self.storage.oldest + np.arange(len(self))) % self.capacity)

    def state_dict(self) -> dict:
        slots = self.storage.slots_in_use
        return {**self.storage.state_dict(), **self.sampler.state_dict(slots)}

    def load_state_dict(self, state: dict) -> None:
        self.storage.load_state_dict(state)
        self.sampler.load_state_dict(state, self.storage.slots_in_use)

    def save(self, uri: str) -> None:
        """Snapshot to one Parquet file (local path or pyarrow URI), atomically."""
        write_table(self.snapshot_table(), uri)

    def snapshot_table(self, copy: bool = False) -> pa.Table:
        """The buffer as an Arrow table (with `copy`, detached from the live arrays, so
        it can be written while the buffer changes)."""
        state = self.state_dict()
        if copy:
            state = {
                k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                for k, v in state.items()
            }
        columns, meta = self.storage.columns(state)
        if "priorities" in state:
            priorities = state["priorities"]
            rows = len(next(iter(columns.values())))
            columns["priority"] = np.concatenate([priorities, np.zeros(rows - len(priorities))])
        meta |= {
            "max_priority": state.get("max_priority", 1.0),
            "obs_shape": list(self.obs_shape),
            "obs_dtype": self.obs_dtype.str,
            "storage": type(self.storage).__name__,
        }
        return pa.table(columns).replace_schema_metadata({"rayline.replay": json.dumps(meta)})

    def restore(self, uri: str) -> None:
        """Load a snapshot written by `save`."""
        fs, path = filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        meta = json.loads(table.schema.metadata[b"rayline.replay"])
        stored = (
            tuple(meta["obs_shape"]),
            np.dtype(meta["obs_dtype"]),
            meta.get("storage", "RingStorage"),
        )
        if stored != (self.obs_shape, self.obs_dtype, type(self.storage).__name__):
            raise ValueError(
                f"{uri}: snapshot holds observations {meta['obs_shape']} {meta['obs_dtype']} "
                f"in {stored[2]}, this buffer {list(self.obs_shape)} {self.obs_dtype.str} "
                f"in {type(self.storage).__name__}"
            )
        state = self.storage.state_from_table(table, meta)
        state["max_priority"] = meta["max_priority"]
        if "priority" in table.column_names:
            state["priorities"] = table.column("priority").to_numpy()[: len(state["actions"])]
        self.load_state_dict(state)


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    atomic_write(fs, path, lambda out: pq.write_table(table, out))


# No restarts by Ray: a restarted replay would silently be empty. The driver rebuilds a
# dead replay itself from its latest background snapshot (rayline.rl.apex).
@ray.remote(num_cpus=0, max_restarts=0)
class ReplayActor:
    """One replay shard: collectors `add`, the learner `sample_at` and
    `update_priorities`. Calls run one at a time, so the buffer needs no lock."""

    def __init__(self, **buffer_kwargs):
        self.buffer = ReplayBuffer(**buffer_kwargs)
        self.writer: threading.Thread | None = None

    def add(self, batch: Transitions | FrameTransitions) -> int:
        self.buffer.add(batch)
        return len(self.buffer)

    def sample_at(self, points: np.ndarray) -> ShardSample:
        return self.buffer.sample_at(points)

    def mass(self) -> tuple[float, int]:
        return self.buffer.mass(), len(self.buffer)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.buffer.update_priorities(indices, td_errors)

    def size(self) -> int:
        return len(self.buffer)

    def memory(self) -> dict:
        return self.buffer.memory()

    def save(self, uri: str) -> str:
        self.buffer.save(uri)
        return uri

    def restore(self, uri: str) -> dict:
        self.buffer.restore(uri)
        return {"size": len(self.buffer), "added": self.buffer.added}

    def snapshot(self, uri: str) -> dict:
        """Copy the buffer (the only part that holds up adds and samples: `stall_s`) and
        write the copy to `uri` in a background thread, atomically, so the file is always
        a whole snapshot. While the previous one is still being written, none is taken."""
        if self.writer is not None and self.writer.is_alive():
            return {"taken": False}
        started = time.perf_counter()
        table = self.buffer.snapshot_table(copy=True)
        stall_s = time.perf_counter() - started
        self.writer = threading.Thread(target=write_table, args=(table, uri), daemon=True)
        self.writer.start()
        return {"taken": True, "added": self.buffer.added, "stall_s": stall_s}


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


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40
