"""Freed memory given back to the OS, for processes that live for weeks."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)

# For the processes that run for long under load (serving replicas, the DQN trial's
# actors, the driver of a run): glibc's allocator with 2 arenas instead of one per thread
# (8 per core). With an arena per thread, a gateway replica's native memory grew for as
# long as it served (up to 61 MB an hour in 15-minute soaks; under 17 with the cap) and a
# replay shard's after it was full (22 to 44 MB an hour; 0.4 with the cap):
# docs/benchmarks.md. glibc reads it from the environment a process starts with: the Ray
# that rayline starts locally inherits it from the CLI (every process of it, with no
# runtime env: one keeps an actor off Ray's prestarted workers); a cluster gets it from
# the deploy files and the serving replicas' runtime env. A process that is already
# running caps itself (`cap_arenas`).
# Arrow's buffers (Parquet snapshots and logs, Tune's file syncs) from glibc too, not from
# the mimalloc pool pyarrow picks by default: in a 20-minute training soak the driver's
# 1 GiB mimalloc region grew 6.4 MB an hour, most of its growth then (docs/benchmarks.md).
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}


M_ARENA_MAX = -8
"""mallopt's parameter number for the arena count (glibc's malloc.h)."""


def cap_arenas() -> bool:
    """Give this running process ALLOCATOR_ENV's arena cap from now on (glibc's
    `mallopt`), unless its environment set one; False where the C library has no such
    call. Arenas are made as threads first allocate, so call it before threads start."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return mallopt(M_ARENA_MAX, int(ALLOCATOR_ENV["MALLOC_ARENA_MAX"])) == 1


def use_system_arrow_pool() -> bool:
    """Allocate this running process's Arrow buffers from here on as ALLOCATOR_ENV has
    it (pyarrow read its environment when imported), unless its environment chose a
    pool; False where it did."""
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return False
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    return True


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
