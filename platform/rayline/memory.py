"""Freed memory given back to the OS, for processes that live for weeks."""

from __future__ import annotations

import ctypes
import ctypes.util

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)

# For the processes that run for long under load (serving replicas, the DQN trial's
# actors): glibc's allocator with 2 arenas instead of one per thread (8 per core). With
# an arena per thread, a gateway replica's native memory grew for as long as it served
# (up to 61 MB an hour in 15-minute soaks; under 17 with the cap) and a replay shard's
# after it was full (22 to 44 MB an hour; 0.4 with the cap): docs/benchmarks.md. glibc
# reads it at a process's first allocation, so it goes in the environment a worker
# process starts with (a runtime env), never set from inside one.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2"}


def release_freed_memory() -> bool:
    """Give the pages of freed objects back to the OS (glibc's `malloc_trim`); False where
    the C library has no such call. glibc keeps what a thread frees in that thread's arena
    for its next allocations, and arenas are handed round the threads that come and go:
    a Serve replica that swapped models grew by the old models' pages at each reload, a
    replay shard by each background snapshot's (benchmarks/soak.py)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
