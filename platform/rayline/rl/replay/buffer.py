"""The replay buffer: a storage composed with a sampler, plain Python (the actor is a
shell around it)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayline.fs import filesystem
from rayline.rl.replay.batches import FrameTransitions, SampledBatch, ShardSample, Transitions
from rayline.rl.replay.parquet import write_table
from rayline.rl.replay.samplers import (
    PrioritisedSampler,
    Sampler,
    UniformSampler,
    importance_weights,
    stratified_points,
)
from rayline.rl.replay.storage import FrameStorage, RingStorage, Storage


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
        self.storage: Storage = (
            FrameStorage(capacity, obs_shape, obs_dtype, frames_per_transition)
            if frames
            else RingStorage(capacity, obs_shape, obs_dtype)
        )
        self.capacity, self.obs_shape = capacity, self.storage.obs_shape
        self.obs_dtype = self.storage.obs_dtype
        self.rng = np.random.default_rng(seed)
        self.sampler: Sampler = (
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
        """The buffer as one Parquet file (local path or pyarrow URI), atomically."""
        write_table(self.as_table(), uri)

    def as_table(self, copy: bool = False) -> pa.Table:
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
        """Load a Parquet file written by `save` (or a background snapshot)."""
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
                f"{uri}: the file holds observations {meta['obs_shape']} {meta['obs_dtype']} "
                f"in {stored[2]}, this buffer {list(self.obs_shape)} {self.obs_dtype.str} "
                f"in {type(self.storage).__name__}"
            )
        state = self.storage.state_from_table(table, meta)
        state["max_priority"] = meta["max_priority"]
        if "priority" in table.column_names:
            state["priorities"] = table.column("priority").to_numpy()[: len(state["actions"])]
        self.load_state_dict(state)
