"""How the model registry (rayline.store) opens a store and reads and writes what is in
it: a store's files are distrusted (a number out of range, nesting past Python's limit,
a name that is not a name: a RegistryError naming the file, never a crash), staging
folders of writers that died are recognised, and records are made JSON."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayline.config import NAME_PATTERN
from rayline.fs import filesystem, process_gone


class RegistryError(Exception):
    """A registry operation failed; the message names the model, version or path."""


def open_store(uri: str, *, create: bool, read_only: bool) -> tuple[pafs.FileSystem, str]:
    try:
        fs, root = filesystem(uri)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as exc:
        raise RegistryError(f"store URI {uri!r} cannot be opened: {exc}") from None
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise RegistryError(f"store URI {uri!r} is a file, not a directory")
    if info.type == pafs.FileType.NotFound and not create:
        raise RegistryError(f"store URI {uri!r} does not exist")
    if read_only:
        return fs, root
    try:
        fs.create_dir(f"{root}/models", recursive=True)
        probe = f"{root}/models/.write-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowIOError) as exc:
        raise RegistryError(f"store URI {uri!r} cannot be written: {exc}") from None
    return fs, root


def parse(raw: bytes, where: str, what: str) -> Any:
    """JSON from a store file; whatever is wrong with it (not JSON, nesting past Python's
    recursion limit, a number out of range) is a RegistryError naming the file."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError, OverflowError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{where}: corrupted {what} ({type(exc).__name__}: {exc})") from None


def user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # a container's uid without a passwd entry
        return str(os.getuid())


def check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise RegistryError(
            f"bad {what} {value!r}: expected letters, digits, '.', '_' or '-' (at most 128)"
        )


def writer_is_gone(tag: str) -> bool:
    """Whether the staging tag `<host>-<pid>-<uuid>` names a process of this host that no
    longer runs."""
    host, _, pid = tag.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return process_gone(int(pid))


def newest_mtime(fs: pafs.FileSystem, info: pafs.FileInfo) -> float:
    """The latest modification time of a folder and everything in it, in seconds."""
    times = [info.mtime.timestamp()] if info.mtime else []
    selector = pafs.FileSelector(info.path, recursive=True, allow_not_found=True)
    times += [f.mtime.timestamp() for f in fs.get_file_info(selector) if f.mtime]
    return max(times, default=time.time())


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.delete_dir(path)


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
