"""One replay shard as a Ray actor, with background snapshots."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import ray

from rayline.memory import release_freed_memory
from rayline.rl.replay.batches import FrameTransitions, ShardSample, Transitions
from rayline.rl.replay.buffer import ReplayBuffer
from rayline.rl.replay.parquet import write_table
from rayline.startup import HEALTH_GROUP, ActorStart, exit_quietly_on_sigterm


class Snapshot(NamedTuple):
    """A background snapshot's start: `taken` False while the previous one is written."""

    taken: bool
    added: int = 0
    stall_s: float = 0.0


class Restored(NamedTuple):
    """A shard loaded from a snapshot: its transitions, and how many were ever added."""

    size: int
    added: int


# No restarts by Ray: a restarted replay would silently be empty. The run loop rebuilds a
# dead replay itself from its latest background snapshot (rayline.rl.fleet).
# No task events: tens of calls a second filled the GCS's task table (docs/dqn.md, "Held for hours").
@ray.remote(num_cpus=0, max_restarts=0, enable_task_events=False, concurrency_groups=HEALTH_GROUP)
class ReplayActor:
    """One replay shard: collectors `add`, the learner `sample_at` and
    `update_priorities`. Calls run one at a time, so the buffer needs no lock."""

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        """Answered while a call runs (rayline.startup.HEALTH_GROUP); no answer: hung."""
        return True

    def __init__(self, **buffer_kwargs):
        self.start = ActorStart()
        exit_quietly_on_sigterm()
        self.buffer = ReplayBuffer(**buffer_kwargs)
        self.writer: threading.Thread | None = None
        self.start.constructed()

    def started(self) -> tuple[float, float, float]:
        return self.start.times()

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

    def restore(self, uri: str) -> Restored:
        self.buffer.restore(uri)
        return Restored(len(self.buffer), self.buffer.added)

    def snapshot(self, uri: str) -> Snapshot:
        """Copy the buffer (the only part that holds up adds and samples: `stall_s`) and
        write the copy to `uri` in a background thread, atomically, so the file is always
        a whole snapshot. While the previous one is still being written, none is taken."""
        if self.writer is not None and self.writer.is_alive():
            return Snapshot(taken=False)
        started = time.perf_counter()
        table = self.buffer.as_table(copy=True)
        stall_s = time.perf_counter() - started
        self.writer = threading.Thread(target=write_then_release, args=([table], uri), daemon=True)
        self.writer.start()
        return Snapshot(taken=True, added=self.buffer.added, stall_s=stall_s)


def write_then_release(table: list, uri: str) -> None:
    """Write the snapshot (`table`: a list holding it, so that once written nothing holds
    the copy), then give its freed pages back, glibc's and pyarrow's: pyarrow's pool
    (mimalloc) kept ~50 MB of a finished write's pages, and the soak's replay grew."""
    write_table(table.pop(), uri)
    pa.default_memory_pool().release_unused()
    release_freed_memory()
