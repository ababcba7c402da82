"""Freed memory given back to the OS, for processes that live for weeks."""

from __future__ import annotations

import ctypes
import ctypes.util

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)


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
