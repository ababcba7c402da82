"""A request that a crashed replica held is answered, never replayed onto the others.

The front (HAProxy, rayline.serving.front) sends a request whose replica closed the
connection without an answer to another replica: a replica killed from outside (its host
lost, an operator's `kill -9`, a memory limit) fails no client. But a request that itself
crashes the process that computes it (a native fault in a model's code: SIGSEGV, SIGABRT,
SIGBUS, SIGFPE, SIGILL) would crash the next replica, and the next, until none is up.

So the front names each request (`REQUEST_ID_HEADER`, HAProxy's unique id: a client's
own value is replaced), and the gateway replicas of a host keep the names of the requests
they hold in one shared table, `HeldRequests`: a file of fixed slots in the Ray session's
folder, mapped into each replica, a slot per name's hash. Each replica also points
Python's fault handler at a file of its own, which stays empty unless the process dies of
a fault. A replica handed a request that the table says another process held looks at
that process's fault file: a fault there means it crashed with the request in hand, and
the request is answered 502 naming that, never computed; a process that left no fault
(killed from outside) had its requests taken over, as before.

Limits, said where they matter (docs/serving.md): the table is per host, so a request
replayed onto a replica on another host is computed (the cluster path, as before); a
process the kernel's OOM killer ends leaves no fault, so its requests are replayed (each
kind's limits bound what one request may allocate, benchmarks/hostile.py); the requests
a crashed replica held beside the one that crashed it are refused with it (which one did
it cannot be told). Two requests whose names share a slot at the same moment overwrite
each other's entry: a replay of either is then computed (16,384 slots against at most a
few hundred requests in flight per host).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import mmap
import os
import re
import struct
import time
import zlib

from rayline.fs import process_gone

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Rayline-Request"
REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()
"""The header as the ASGI scope holds it."""

SLOTS = 16_384
SLOT = struct.Struct("=I32s")  # the holder's pid, the request's name (a UUID's 32 digits)
TABLE_FILE = "held-requests"
FAULT_PREFIX = "fault-"
LOGGED = ".logged"
"""Beside a fault file once a replica has logged it."""
STALE_FAULT_S = 600.0
"""A dead process's fault file is removed by the next replica to start after this long
(replays come within a second of the crash; the file keeps its traceback for a reader)."""

REFUSED = (
    "this request was in the hands of a replica that crashed (process {pid}); it is not "
    "replayed on another replica, where it could crash that one too"
)


def request_name(value: bytes | None) -> bytes | None:
    """The request's 32-digit name from the front's header (a UUID), None for anything
    else (a client that reached a replica's port directly may send what it likes)."""
    if value is None or len(value) != 36:
        return None
    name = value.replace(b"-", b"")
    return name if len(name) == 32 and name.isalnum() else None


class HeldRequests:
    """This process's view of the host's table of requests held by gateway replicas."""

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory, self.pid = directory, os.getpid()
        path = os.path.join(directory, TABLE_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = SLOTS * SLOT.size
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zeros; two replicas doing it at once agree
            self.table = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.told: set[int] = set()
        self.tidy_faults()
        # A file of our own for the fault handler: empty unless this process dies of a
        # fault. It replaces Ray's handler (which wrote to the worker's log): the first
        # replica to see the fault (refusing a replay, or starting) logs the traceback.
        self.fault_file = open(self.fault_path(self.pid), "w")  # noqa: SIM115 (for life)
        faulthandler.enable(file=self.fault_file, all_threads=True)

    def fault_path(self, pid: int) -> str:
        return os.path.join(self.directory, f"{FAULT_PREFIX}{pid}")

    @staticmethod
    def slot(name: bytes) -> int:
        """Where the table keeps `name`: an offset into it."""
        return (zlib.crc32(name) % SLOTS) * SLOT.size

    def take(self, name: bytes) -> str | None:
        """Hold the request named `name` here; a refusal (why) when another process
        held it and crashed."""
        offset = self.slot(name)
        holder, held = SLOT.unpack_from(self.table, offset)
        if held == name and holder != self.pid and holder:
            fault = self.fault(holder)
            if fault is not None:
                self.tell(holder, fault)
                return REFUSED.format(pid=holder)
        SLOT.pack_into(self.table, offset, self.pid, name)
        return None

    def release(self, name: bytes) -> None:
        offset = self.slot(name)
        holder, held = SLOT.unpack_from(self.table, offset)
        if holder == self.pid and held == name:
            SLOT.pack_into(self.table, offset, 0, b"")

    def fault(self, pid: int) -> str | None:
        """What the process wrote when it died of a fault; None when it did not."""
        try:
            with open(self.fault_path(pid), errors="replace") as f:
                text = f.read(65_536)
        except OSError:
            return None
        return text if text.strip() else None

    def tell(self, pid: int, fault: str) -> None:
        """Log the process's fault, once on this host (the first replica to see it)."""
        if pid in self.told:
            return
        self.told.add(pid)
        try:
            os.close(os.open(self.fault_path(pid) + LOGGED, os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
        logger.error(
            "rayline: a gateway replica (process %d) crashed of a fault; each request in "
            "its hands is answered 502 when the front replays it, not computed. Its "
            "fault:\n%s",
            pid,
            fault.strip(),
        )

    def tidy_faults(self) -> None:
        """For the fault files of dead processes: each fault logged once by the first
        replica to start after it (a crashed replica's traceback is in no log of its
        own), and the files of processes gone for STALE_FAULT_S removed (a killed replica
        runs no clean-up)."""
        now = time.time()
        for entry in os.scandir(self.directory):
            match = re.fullmatch(rf"{FAULT_PREFIX}(\d+)", entry.name)
            if match is None or not process_gone(pid := int(match.group(1))):
                continue
            try:
                if now - entry.stat().st_mtime > STALE_FAULT_S:
                    for path in (entry.path, entry.path + LOGGED):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                elif (fault := self.fault(pid)) is not None:
                    self.tell(pid, fault)
            except OSError:
                pass  # another replica removed it first


def table_directory() -> str:
    """Where this host's Ray session keeps the table and the fault files."""
    from rayline.raycompat import session_and_temp_dirs

    return os.path.join(session_and_temp_dirs()[0], "rayline-held-requests")


def held_requests() -> HeldRequests | None:
    """The table of this host's Ray session; None (nothing tracked, a warning) where it
    cannot be made."""
    try:
        return HeldRequests(table_directory())
    except (OSError, AttributeError) as exc:
        logger.warning("rayline: requests held are not tracked, replays not checked: %s", exc)
        return None
