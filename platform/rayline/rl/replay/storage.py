"""Where transitions live: preallocated arrays written round a ring (`RingStorage`), or,
for stacked-frame pixels, single frames referenced by index (`FrameStorage`). Both fail
fast, before allocating, when they cannot fit in this machine, and both turn their state
into Arrow columns for Parquet files (rayline.rl.replay.parquet writes them)."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import pyarrow as pa

from rayline.rl.replay.batches import FrameTransitions, Transitions
from rayline.rl.replay.parquet import fixed_list_column
from rayline.rl.replay.samplers import SAMPLER_BYTES


class Storage(Protocol):
    """What the buffer asks of a storage. `add` returns (slots written, slots dropped)."""

    capacity: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    added: int
    oldest: int

    def __len__(self) -> int: ...

    @property
    def slots_in_use(self) -> int: ...

    def add(self, batch) -> tuple[np.ndarray, np.ndarray]: ...

    def gather(self, indices: np.ndarray) -> Transitions: ...

    def memory(self) -> dict: ...

    def check_valid(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def columns(self, state: dict) -> tuple[dict, dict]: ...

    def state_from_table(self, table: pa.Table, meta: dict) -> dict: ...


def check_memory(needed: int, what: str) -> None:
    """Fail fast, before allocating, when `needed` bytes cannot fit in this machine."""
    available = physical_memory_bytes()
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
        check_transition_values(self.rewards[:size], self.discounts[:size])

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
            "obs": fixed_list_column(table, "obs", self.obs_shape),
            "next_obs": fixed_list_column(table, "next_obs", self.obs_shape),
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
        check_transition_values(self.rewards[held], self.discounts[held])

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
            "frames": fixed_list_column(table, "frame", self.frame_shape)[:frames],
            "obs_frames": fixed_list_column(table, "obs_frames", (self.stack,))[:slots],
            "next_frames": fixed_list_column(table, "next_frames", (self.stack,))[:slots],
            "batch_first_frame": table.column("batch_first_frame").to_numpy()[:slots],
            "actions": table.column("action").to_numpy()[:slots],
            "rewards": table.column("reward").to_numpy()[:slots],
            "discounts": table.column("discount").to_numpy()[:slots],
            "added": meta["added"],
            "frames_added": meta["frames_added"],
            "oldest": meta["oldest"],
        }


def check_transition_values(rewards: np.ndarray, discounts: np.ndarray) -> None:
    assert np.all(np.isfinite(rewards)), "non-finite reward stored"
    assert np.all((discounts >= 0) & (discounts <= 1)), "discount outside [0, 1]"


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40
