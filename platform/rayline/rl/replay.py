"""Experience replay: preallocated numpy storage composed with a uniform or prioritised
sampler, plus the thin Ray actor that shares one buffer between collectors and learner.

Prioritised replay follows Schaul et al. 2016 (https://arxiv.org/abs/1511.05952):
P(i) = p_i^alpha / sum_k p_k^alpha, importance weights (N * P(i))^-beta normalised by
the batch maximum, new transitions at the highest priority seen so far.

Indices are slots in this buffer; a sharded replay would put several of these behind a
facade that offsets each shard's indices by shard * capacity.
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


class SampledBatch(NamedTuple):
    """Transitions drawn from the replay with their slots and importance weights."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray
    weights: np.ndarray
    indices: np.ndarray


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


class RingStorage:
    """Transitions in preallocated arrays, written round a ring: slot = added % capacity.
    Fails fast, in the constructor, when the arrays cannot fit in this machine."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype | str):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs_shape = tuple(obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        needed = (
            2 * capacity * int(np.prod(self.obs_shape)) * self.obs_dtype.itemsize + capacity * 16
        )
        available = _physical_memory_bytes()
        if needed > 0.8 * available:
            raise MemoryError(
                f"replay of {capacity:,} transitions of {self.obs_shape} {self.obs_dtype} needs "
                f"{needed / 2**30:.1f} GiB; this machine has {available / 2**30:.1f} GiB"
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

    def add(self, batch: Transitions) -> np.ndarray:
        """Store `batch` (only its newest `capacity` if larger); returns the slots written."""
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
        return slots

    def gather(self, indices: np.ndarray) -> Transitions:
        return Transitions(
            self.obs[indices],
            self.actions[indices],
            self.rewards[indices],
            self.next_obs[indices],
            self.discounts[indices],
        )

    def check_valid(self) -> None:
        size = len(self)
        assert 0 <= size <= self.capacity, f"size {size} outside [0, {self.capacity}]"
        assert np.all(np.isfinite(self.rewards[:size])), "non-finite reward stored"
        assert np.all((self.discounts[:size] >= 0) & (self.discounts[:size] <= 1)), (
            "discount outside [0, 1]"
        )

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


class UniformSampler:
    """Every stored transition equally likely; importance weights all 1."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.rng = rng

    def added(self, slots: np.ndarray) -> None:
        pass

    def sample(self, batch_size: int, size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        return self.rng.integers(0, size, batch_size), np.ones(batch_size, dtype=np.float32)

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        pass

    def check_valid(self, size: int) -> None:
        pass

    def state_dict(self, size: int) -> dict:
        return {}

    def load_state_dict(self, state: dict, size: int) -> None:
        pass


class PrioritisedSampler:
    """Proportional prioritisation on a sum tree: P(i) = p_i^alpha / sum p^alpha, new
    transitions at the highest priority seen, stratified draws, weights (N P(i))^-beta
    normalised by the batch maximum."""

    def __init__(self, capacity: int, rng: np.random.Generator, alpha: float, priority_eps: float):
        self.capacity, self.rng = capacity, rng
        self.alpha, self.priority_eps = alpha, priority_eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def added(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.full(len(slots), self.max_priority**self.alpha))

    def sample(self, batch_size: int, size: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
        # Stratified: one draw from each of batch_size equal slices of the total mass.
        total = self.tree.total
        bounds = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        indices = np.minimum(self.tree.find(np.minimum(bounds, total * (1 - 1e-12))), size - 1)
        probs = self.tree.get(indices) / total
        weights = (size * probs) ** (-beta)
        return indices, (weights / weights.max()).astype(np.float32)

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.priority_eps
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priority update with non-finite TD errors")
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(np.asarray(indices), priorities**self.alpha)

    def check_valid(self, size: int) -> None:
        leaves = self.tree.nodes[self.tree.leaves :]
        assert np.all(leaves[:size] > 0), "stored transition with zero priority"
        assert np.all(leaves[size:] == 0), "empty slot with non-zero priority"
        inner = np.arange(1, self.tree.leaves)
        sums = self.tree.nodes[2 * inner] + self.tree.nodes[2 * inner + 1]
        assert np.allclose(self.tree.nodes[inner], sums, rtol=1e-9, atol=1e-9), (
            "sum tree inconsistent"
        )

    def state_dict(self, size: int) -> dict:
        return {
            "max_priority": self.max_priority,
            "priorities": self.tree.get(np.arange(size)) ** (1.0 / self.alpha),
        }

    def load_state_dict(self, state: dict, size: int) -> None:
        self.max_priority = float(state.get("max_priority", 1.0))
        self.tree = SumTree(self.capacity)
        if size:
            priorities = state.get("priorities", np.full(size, self.max_priority))
            self.tree.set(np.arange(size), np.asarray(priorities) ** self.alpha)


class ReplayBuffer:
    """The replay: ring storage composed with a uniform or prioritised sampler. Plain
    Python: the Ray actor below is only a shell."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: np.dtype | str = np.float32,
        *,
        prioritized: bool = True,
        alpha: float = 0.6,
        priority_eps: float = 1e-6,
        seed: int = 0,
    ):
        self.storage = RingStorage(capacity, obs_shape, obs_dtype)
        self.capacity, self.obs_shape = capacity, self.storage.obs_shape
        self.obs_dtype = self.storage.obs_dtype
        rng = np.random.default_rng(seed)
        self.sampler: UniformSampler | PrioritisedSampler = (
            PrioritisedSampler(capacity, rng, alpha, priority_eps)
            if prioritized
            else UniformSampler(capacity, rng)
        )

    def __len__(self) -> int:
        return len(self.storage)

    @property
    def added(self) -> int:
        return self.storage.added

    def add(self, batch: Transitions) -> None:
        if len(batch.actions):
            self.sampler.added(self.storage.add(batch))

    def sample(self, batch_size: int, beta: float = 0.4) -> SampledBatch:
        size = len(self)
        if size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        indices, weights = self.sampler.sample(batch_size, size, beta)
        return SampledBatch(*self.storage.gather(indices), weights, indices)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.sampler.update(indices, td_errors)

    def check_valid(self) -> None:
        """Raise AssertionError if any invariant of the storage or sampler is broken."""
        self.storage.check_valid()
        self.sampler.check_valid(len(self))

    def state_dict(self) -> dict:
        return {**self.storage.state_dict(), **self.sampler.state_dict(len(self))}

    def load_state_dict(self, state: dict) -> None:
        self.storage.load_state_dict(state)
        self.sampler.load_state_dict(state, len(self))

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
        flat = int(np.prod(self.obs_shape))
        columns = {
            "obs": pa.FixedSizeListArray.from_arrays(state["obs"].reshape(-1), flat),
            "next_obs": pa.FixedSizeListArray.from_arrays(state["next_obs"].reshape(-1), flat),
            "action": state["actions"],
            "reward": state["rewards"],
            "discount": state["discounts"],
        }
        if "priorities" in state:
            columns["priority"] = state["priorities"]
        meta = {
            "added": state["added"],
            "max_priority": state.get("max_priority", 1.0),
            "obs_shape": list(self.obs_shape),
            "obs_dtype": self.obs_dtype.str,
        }
        return pa.table(columns).replace_schema_metadata({"rayline.replay": json.dumps(meta)})

    def restore(self, uri: str) -> None:
        """Load a snapshot written by `save`."""
        fs, path = filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        meta = json.loads(table.schema.metadata[b"rayline.replay"])
        if (
            tuple(meta["obs_shape"]) != self.obs_shape
            or np.dtype(meta["obs_dtype"]) != self.obs_dtype
        ):
            raise ValueError(
                f"{uri}: snapshot holds observations {meta['obs_shape']} {meta['obs_dtype']}, "
                f"this buffer {list(self.obs_shape)} {self.obs_dtype.str}"
            )

        def obs_column(name: str) -> np.ndarray:
            values = table.column(name).combine_chunks().flatten().to_numpy()
            return values.reshape(-1, *self.obs_shape)

        state = {
            "obs": obs_column("obs"),
            "next_obs": obs_column("next_obs"),
            "actions": table.column("action").to_numpy(),
            "rewards": table.column("reward").to_numpy(),
            "discounts": table.column("discount").to_numpy(),
            "added": meta["added"],
            "max_priority": meta["max_priority"],
        }
        if "priority" in table.column_names:
            state["priorities"] = table.column("priority").to_numpy()
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
    """The shared replay: collectors `add`, the learner `sample_many` and
    `update_priorities`. Calls run one at a time, so the buffer needs no lock."""

    def __init__(self, **buffer_kwargs):
        self.buffer = ReplayBuffer(**buffer_kwargs)
        self.writer: threading.Thread | None = None

    def add(self, batch: Transitions) -> int:
        self.buffer.add(batch)
        return len(self.buffer)

    def sample_many(self, num_batches: int, batch_size: int, beta: float) -> SampledBatch:
        """`num_batches` batches in one call (one round trip), stacked on axis 0."""
        batches = [self.buffer.sample(batch_size, beta) for _ in range(num_batches)]
        return SampledBatch(*(np.stack(field) for field in zip(*batches)))

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.buffer.update_priorities(indices.reshape(-1), td_errors.reshape(-1))

    def size(self) -> int:
        return len(self.buffer)

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


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40
