"""Requests answered together: one computation for the calls that arrive while the
previous one runs.

Why not `@serve.batch`: it waits up to `batch_wait_timeout_s` for a batch to fill, so a
lone request pays that wait, and it batches one method's calls only. This batcher never
waits (a call that finds nothing running is computed at once; only calls that arrive
meanwhile are grouped), and a route groups what it likes (a batch may hold requests for
several models or versions, each answered by its own forward pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """Concurrent calls share one `compute(items) -> answers` (an answer may be an
    exception, raised to its caller alone). A call that finds nothing queued is computed
    at once; calls that arrive while a computation runs wait for it and go together in
    the next: batches cost no latency at low load."""

    def __init__(self, compute: Callable[[list], Awaitable[list]], max_batch: int):
        self.compute, self.max_batch = compute, max_batch
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.running = False

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
                # A caller that gave up while its item queued (its timeout cancelled the
                # future) gets nothing computed for it.
                batch = [(item, future) for item, future in batch if not future.done()]
                if not batch:
                    continue
                try:
                    answers = await self.compute([item for item, _ in batch])
                except Exception as exc:
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers):
                    if future.done():  # its caller timed out
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self.running = False
