"""Worker threads per model, so that one model's slow requests cannot stall another's.

A request's model work that does not belong on the event loop (a forward pass, image
decoding, a batch of recommendations) runs in a thread. With one shared pool (asyncio's
default, 6 threads on 2 cores) a handful of expensive requests to one model held every
thread, and every other model's requests queued behind them until their timeout. Here
each model (or batcher) has its own few threads and a bounded queue:

- a full queue answers 503 with Retry-After at once (`Busy`), instead of queueing work
  that would only time out;
- work whose caller has gone (its timeout passed, the client closed the connection) is
  dropped before it starts: cancelling the awaiting task cancels the queued call;
- a call counts until its thread is done, so a call still running past its caller's 504
  keeps its place taken and the queue's bound holds;
- a call the route counted as heavy (many rows, many pixels: each kind says) runs on
  the model's heavy lane: one thread in the OS's idle scheduling class, so that
  expensive requests, hostile or not, take the CPU and memory that light ones leave
  instead of sharing them evenly with them;
- while a heavy call runs, Python's GIL switch interval is 0.5 ms (`HEAVY_GIL_SWITCH_S`);
- `saturated(models)` says when every model's light lane is full: the replica cannot take work, and its
  readiness (/readyz) says so, so the front routes around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

THREADS_PER_MODEL = max(2, min(4, os.cpu_count() or 1))
"""Light calls to one model running at once: more gain nothing on the replica's cores
(torch runs one thread per worker), fewer would let one slow call block the model."""
QUEUED_PER_MODEL = 32
"""Calls to one model's lane waiting for a thread; past them a request is answered 503.
At the replica's limit of 128 requests in flight, a quarter of them on one model."""


HEAVY_GIL_SWITCH_S = 0.0005
"""Python's GIL switch interval while a heavy call runs (its default, 5 ms, otherwise). A
heavy thread in the idle class that holds the GIL is set aside by the scheduler while
it holds it, and the event loop, which answers every request, waits for it: beside the
hostile mix of benchmarks/hostile.py the legitimate p99 was 506 ms with 5 ms throughout
and 102 ms with 0.5 ms throughout (single runs: the figure moves a lot from run to run).
At 0.5 ms throughout, the recommender lost 8-14 % of its requests a second at
concurrency 32 (docs/benchmarks.md), hence only while a heavy call runs."""


def lower_priority() -> None:
    """In a heavy lane's new thread: Linux's idle scheduling class for that thread alone
    (Linux schedules threads, not processes): it runs on what CPU the replica's other
    threads, and the machine's other processes, leave. A nice value was not enough: Ray
    starts its workers at nice 15 already, and 19 is the floor."""
    # Not on Linux: the lane still bounds the work, at the usual priority.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


class Busy(Exception):
    """This model's lane has its threads and queue full: retry shortly (503, Retry-After)."""


class WorkPools:
    """Per key (a model's name) two lanes, light and heavy, each a thread pool and the
    count of its calls not yet done (queued or running)."""

    def __init__(self, threads: int = THREADS_PER_MODEL, queued: int = QUEUED_PER_MODEL):
        self.threads, self.queued = threads, queued
        self.pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.pending: dict[str, int] = {}
        self.lock = threading.Lock()  # done-callbacks run in the worker threads
        self.heavy_pending = 0
        self.switch_interval_s = sys.getswitchinterval()

    def capacity(self, heavy: bool = False) -> int:
        return (1 if heavy else self.threads) + self.queued

    def busy(self, lane: str, heavy: bool = False) -> bool:
        return self.pending.get(lane, 0) >= self.capacity(heavy)

    def saturated(self, keys: Iterable[str]) -> bool:
        """The light lane of every one of `keys` (the models a replica holds) full: none
        can take another call now."""
        keys = list(keys)
        return bool(keys) and all(self.busy(key) for key in keys)

    async def run(self, key: str, function: Callable, *args, heavy: bool = False) -> Any:
        """`function(*args)` on `key`'s light threads, or on its heavy lane; `Busy` when
        the lane's threads and queue are full."""
        lane = f"{key} (heavy)" if heavy else key
        if self.busy(lane, heavy):
            raise Busy(f"{lane!r} has {self.capacity(heavy)} calls in hand; retry shortly")
        pool = self.pools.get(lane)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(
                1 if heavy else self.threads,
                thread_name_prefix="rayline-heavy" if heavy else "rayline-model",
                initializer=lower_priority if heavy else None,
            )
            self.pools[lane] = pool
        with self.lock:
            self.pending[lane] = self.pending.get(lane, 0) + 1
            if heavy:
                self.heavy_pending += 1
                sys.setswitchinterval(HEAVY_GIL_SWITCH_S)
        future = pool.submit(function, *args)
        future.add_done_callback(lambda _: self._done(lane, heavy))
        # Cancelling this await (a timeout, a client gone) cancels the call if it has
        # not started.
        return await asyncio.wrap_future(future)

    def _done(self, lane: str, heavy: bool) -> None:
        with self.lock:
            self.pending[lane] -= 1
            if heavy:
                self.heavy_pending -= 1
                if not self.heavy_pending:
                    sys.setswitchinterval(self.switch_interval_s)
