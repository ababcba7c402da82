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
- `saturated(models)` says when every model's pool is full: the replica cannot take work, and its
  readiness (/readyz) says so, so the front routes around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

THREADS_PER_MODEL = max(2, min(4, os.cpu_count() or 1))
"""Threads one model's work runs on at once: more gain nothing on the replica's cores
(torch runs one thread per worker), fewer would let one slow call block the model."""
QUEUED_PER_MODEL = 32
"""Calls to one model waiting for a thread; past them a request is answered 503. At the
replica's limit of 128 requests in flight, a quarter of them on one model."""


class Busy(Exception):
    """This model's threads and queue are full: retry shortly (503, Retry-After)."""


class WorkPools:
    """Per key (a model's name, or a batcher's), a thread pool and the count of its calls
    not yet done (queued or running)."""

    def __init__(self, threads: int = THREADS_PER_MODEL, queued: int = QUEUED_PER_MODEL):
        self.threads, self.queued = threads, queued
        self.pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.pending: dict[str, int] = {}
        self.lock = threading.Lock()  # done-callbacks run in the worker threads

    def busy(self, key: str) -> bool:
        return self.pending.get(key, 0) >= self.threads + self.queued

    def saturated(self, keys: Iterable[str]) -> bool:
        """Every one of `keys` (the models a replica holds) full: none can take another
        call now."""
        keys = list(keys)
        return bool(keys) and all(self.busy(key) for key in keys)

    async def run(self, key: str, function: Callable, *args) -> Any:
        """`function(*args)` on `key`'s threads; `Busy` when they and the queue are full."""
        if self.busy(key):
            raise Busy(f"{key!r} has {self.threads + self.queued} calls in hand; retry shortly")
        pool = self.pools.get(key)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix=f"rayline-{key}"[:15]
            )
            self.pools[key] = pool
        with self.lock:
            self.pending[key] = self.pending.get(key, 0) + 1
        future = pool.submit(function, *args)
        future.add_done_callback(lambda _: self._done(key))
        # Cancelling this await (a timeout, a client gone) cancels the call if it has
        # not started.
        return await asyncio.wrap_future(future)

    def _done(self, key: str) -> None:
        with self.lock:
            self.pending[key] -= 1

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
