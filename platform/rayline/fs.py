"""Files by URI: a pyarrow filesystem for a local path, `file://`, `s3://` or `gs://`,
and fingerprints of the data files that models are trained on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import pyarrow.fs as pafs

CONTENT_HASH_LIMIT_BYTES = 256 * 1024 * 1024
"""Files up to this size are fingerprinted by their bytes; larger ones by size and
modification time (or, on object stores, size and the store's own change marker)."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI (`s3://`, `gs://`, `file://`) or local path."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


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
