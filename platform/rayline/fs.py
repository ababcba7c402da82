"""Files by URI: a pyarrow filesystem for a local path, `file://`, `s3://` or `gs://`,
the one atomic write everything uses, and fingerprints of the data files that models
are trained on."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow.fs as pafs

CONTENT_HASH_LIMIT_BYTES = 256 * 1024 * 1024
"""Files up to this size are fingerprinted by their bytes; larger ones by size and
modification time (or, on object stores, size and the store's own change marker)."""


def process_gone(pid: int) -> bool:
    """Whether no process of this host has the pid now (one of another user's counts as
    running: signalling it is refused, it is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI (`s3://`, `gs://`, `file://`) or local path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see the old file or the new one, never half of one.
    `write(stream)` writes the content. On a local filesystem: a temporary file beside the
    target, flushed to disk, then renamed over it; an object store's single PUT is atomic
    by itself."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as out:
            write(out)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """`data` to the file at `uri` (a local path or a URI), atomically."""
    fs, path = filesystem(uri)
    atomic_write(fs, path, lambda out: out.write(data))


def fingerprint(*parts: bytes | str) -> str:
    """A short stable fingerprint of data (sha256 over the parts, in order)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return "sha256:" + digest.hexdigest()[:32]


def file_digests(fs: pafs.FileSystem, paths: Iterable[str]) -> list[str]:
    """One digest per file, of what the file holds: sha256 of its bytes, streamed; for a
    file over CONTENT_HASH_LIMIT_BYTES, its size and modification time (the fast path
    for very large files). A renamed file with the same bytes keeps its digest."""
    paths = list(paths)
    digests = []
    for path, info in zip(paths, fs.get_file_info(paths)):
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        if info.size is not None and info.size > CONTENT_HASH_LIMIT_BYTES:
            mtime = info.mtime_ns if info.mtime_ns is not None else ""
            digests.append(f"size={info.size};mtime_ns={mtime}")
            continue
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        digests.append(digest.hexdigest())
    return digests
