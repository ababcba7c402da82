"""Model registry on pyarrow.fs: versioned models with metadata and aliases.

Layout under the store URI (a local path, `file://`, `s3://` or `gs://`):

    models/<name>/<version>/metadata.json   metrics, config, fingerprint, run, file hashes
    models/<name>/<version>/<artifact files>
    models/<name>/aliases/<alias>.json      {"version": N}; `latest` is derived, never stored
    models/<name>/history/<time>-<host>-<pid>-<id>.json   one event of the model's history

A version's number is its directory name. On a local filesystem a version is written
into a private staging directory and claimed by renaming it to `<version>/`; a rename
onto an existing non-empty directory fails, so concurrent registrations each get their
own number and nobody sees a half-written version. Object stores have no such rename:
there files are written in place with metadata.json last (a version without it is
invisible), and concurrent registration of one name needs an outside lock.

The history holds every registration and alias move (and, from the gates and the canary,
refused promotions and rollbacks): one small JSON file per event, written atomically
under a name that starts with its time, so concurrent writers on any filesystem never
overwrite or interleave one another's events, and a reader sees each one whole.

Artifacts are bytes; this module never unpickles. Pipelines store torch state_dicts
(loaded with `weights_only=True`), XGBoost JSON/UBJSON, numpy/Arrow or JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from rayline import __version__, store_files
from rayline.config import NAME_PATTERN
from rayline.fs import atomic_write
from rayline.store_files import RegistryError

DEFAULT_STORE_URI = "./artifacts"
STAGING_PREFIX = ".staging-"
LATEST = "latest"
MAX_RECORD_BYTES = 1 << 20
"""The most a metadata.json, alias or history file may hold (one registration's
metadata is a few KB): a larger one is refused before it is parsed."""
MAX_ARTIFACT_BYTES = 8 << 30
"""The most an artifact file may hold: a file past it is refused, never read whole into
a serving replica's memory."""


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model, as read from its metadata.json."""

    name: str
    version: int
    kind: str
    """Which pipeline made it (`dqn`, `xgboost`, ...); Serve picks the loader by it."""
    metrics: dict[str, Any]
    config: dict[str, Any]
    data_fingerprint: str
    created_at: str
    rayline_version: str
    run: dict[str, Any]
    files: dict[str, str]
    """Artifact file name -> sha256 of its bytes."""
    uri: str
    """Where the version's files live."""


class ModelRegistry:
    """Register, look up, list and promote model versions in a store URI."""

    def __init__(
        self,
        uri: str = DEFAULT_STORE_URI,
        *,
        create: bool = True,
        stale_staging_s: float = 6 * 3600,
        read_only: bool = False,
    ):
        self.uri = uri
        self.read_only = read_only
        """Opened for reading only (serving): nothing is created or written."""
        self.stale_staging_s = stale_staging_s
        """A staging folder untouched this long belongs to a registration that died."""
        self.fs, self.root = store_files.open_store(
            uri, create=create and not read_only, read_only=read_only
        )
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- writing ---------------------------------------------------------------------

    def register(
        self,
        name: str,
        files: Mapping[str, bytes],
        *,
        kind: str,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        data_fingerprint: str = "",
        run: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store `files` as the next version of model `name` and return that version."""
        self._check_writable()
        store_files.check_name(name, "model name")
        if not files:
            raise RegistryError(f"model {name!r}: nothing to register (no artifact files)")
        for filename in files:
            if filename == "metadata.json" or not NAME_PATTERN.match(filename):
                raise RegistryError(f"model {name!r}: bad artifact file name {filename!r}")
        metadata = {
            "name": name,
            "kind": kind,
            "metrics": dict(metrics or {}),
            "config": dict(config or {}),
            "data_fingerprint": data_fingerprint,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rayline_version": __version__,
            "run": dict(run or {}),
            "files": {fn: hashlib.sha256(data).hexdigest() for fn, data in files.items()},
        }
        body = json.dumps(metadata, indent=2, sort_keys=True, default=store_files.jsonable).encode()
        model_dir = self._model_dir(name)
        self.fs.create_dir(model_dir, recursive=True)
        if self.is_local:
            version = self._register_by_rename(model_dir, files, body)
        else:
            version = self._register_in_place(model_dir, files, body)
        self.record(name, "registered", version=version, kind=kind, metrics=metadata["metrics"])
        return self.get(name, version)

    def _register_by_rename(self, model_dir: str, files: Mapping[str, bytes], body: bytes) -> int:
        self._sweep_stale_staging(model_dir)
        staging = (
            f"{model_dir}/{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        )
        self.fs.create_dir(staging)
        try:
            for filename, data in files.items():
                self._write(f"{staging}/{filename}", data)
            self._write(f"{staging}/metadata.json", body)
            version = max(self._versions_in(model_dir), default=0) + 1
            while True:
                try:
                    self.fs.move(staging, f"{model_dir}/{version}")
                    return version
                except OSError:
                    # Another writer claimed this number first: take the next free one.
                    version = max(max(self._versions_in(model_dir), default=0), version) + 1
        except BaseException:
            store_files.delete_quietly(self.fs, staging)
            raise

    def _sweep_stale_staging(self, model_dir: str) -> None:
        """Delete the staging folders of registrations that died (SIGKILL, power loss):
        those whose writer process on this host is gone, and any untouched for
        `stale_staging_s`. A registration in progress is never one of them."""
        selector = pafs.FileSelector(model_dir, allow_not_found=True)
        now = time.time()
        for info in self._list(selector):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith(
                STAGING_PREFIX
            ):
                continue
            if store_files.writer_is_gone(info.base_name[len(STAGING_PREFIX) :]) or (
                now - store_files.newest_mtime(self.fs, info) > self.stale_staging_s
            ):
                store_files.delete_quietly(self.fs, info.path)

    def _register_in_place(self, model_dir: str, files: Mapping[str, bytes], body: bytes) -> int:
        version = max(self._versions_in(model_dir, complete_only=False), default=0) + 1
        target = f"{model_dir}/{version}"
        for filename, data in files.items():
            self._write(f"{target}/{filename}", data)
        self._write(f"{target}/metadata.json", body)
        return version

    def promote(
        self, name: str, version: int | str, alias: str = "production", **details: Any
    ) -> ModelVersion:
        """Point `alias` of model `name` at `version` (a number or another alias); the
        `details` (a gate's figures) go into the history with the move."""
        self._check_writable()
        store_files.check_name(alias, "alias")
        if alias == LATEST:
            raise RegistryError("alias 'latest' always means the newest version; it cannot be set")
        target = self.get(name, version)
        previous = self.aliases(name).get(alias)
        self.fs.create_dir(f"{self._model_dir(name)}/aliases", recursive=True)
        self._write(self._alias_path(name, alias), json.dumps({"version": target.version}).encode())
        self.record(
            name, "promoted", alias=alias, version=target.version, previous=previous, **details
        )
        return target

    def roll_back(self, name: str, alias: str, version: int, **details: Any) -> bool:
        """Remove `alias` of model `name` if it still points at `version` and record a
        `rolled_back` event with the `details` (the canary's reason and figures). False,
        and no event, when the alias has moved or is gone (another replica was first:
        on a local store one delete wins; an object store may record it twice)."""
        self._check_writable()
        store_files.check_name(alias, "alias")
        try:
            if self.resolve(name, alias) != version:
                return False
            self.fs.delete_file(self._alias_path(name, alias))
        except (RegistryError, FileNotFoundError):
            return False
        self.record(name, "rolled_back", alias=alias, version=version, **details)
        return True

    def record(self, name: str, event: str, **fields: Any) -> dict:
        """Append one event to model `name`'s history (time, event, the fields given, and
        who: user and host) and return it."""
        self._check_writable()
        store_files.check_name(name, "model name")
        now = time.time_ns()
        entry = {
            "time": datetime.fromtimestamp(now / 1e9, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "event": event,
            **fields,
            "who": {"user": store_files.user(), "host": socket.gethostname()},
        }
        folder = f"{self._model_dir(name)}/history"
        self.fs.create_dir(folder, recursive=True)
        stamp = f"{now:020d}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        body = json.dumps(entry, sort_keys=True, default=store_files.jsonable).encode()
        self._write(f"{folder}/{stamp}.json", body)
        return entry

    def history(self, name: str) -> list[dict]:
        """Model `name`'s events, oldest first. An event file that cannot be read is
        listed as {"event": "unreadable", "file", "reason"}, never skipped."""
        if name not in self.names():
            raise RegistryError(f"model {name!r} is not registered in {self.uri}")
        selector = pafs.FileSelector(f"{self._model_dir(name)}/history", allow_not_found=True)
        infos = [i for i in self._list(selector) if i.base_name.endswith(".json")]
        events = []
        for info in sorted(infos, key=lambda i: i.base_name):
            try:
                event = store_files.parse(
                    self._read(info.path), self._show(info.path), "history event"
                )
                if not isinstance(event, dict):
                    raise RegistryError(f"{self._show(info.path)}: not a JSON object")
                events.append(event)
            except (RegistryError, FileNotFoundError) as exc:
                events.append({"event": "unreadable", "file": info.base_name, "reason": str(exc)})
        return events

    def alias_since(self, name: str) -> dict[str, str]:
        """Alias -> when it was last moved (its latest `promoted` event's time)."""
        since = {}
        for entry in self.history(name):
            if entry.get("event") == "promoted" and "alias" in entry:
                since[entry["alias"]] = entry.get("time", "")
        return since

    # -- reading ---------------------------------------------------------------------

    def get(self, name: str, ref: int | str = LATEST) -> ModelVersion:
        """A version of model `name` by number, alias, or `latest`."""
        version = self.resolve(name, ref)
        path = f"{self._model_dir(name)}/{version}/metadata.json"
        try:
            raw = self._read(path)
        except FileNotFoundError:
            raise RegistryError(f"{self._show(path)}: metadata.json is missing") from None
        meta = store_files.parse(raw, self._show(path), "metadata.json")
        try:
            if meta["name"] != name:
                raise RegistryError(
                    f"{self._show(path)}: names model {meta['name']!r}, not its folder's {name!r}"
                )
            files = meta["files"]
            for filename, digest in files.items():
                if filename == "metadata.json" or not NAME_PATTERN.match(filename):
                    raise RegistryError(f"{self._show(path)}: bad artifact file name {filename!r}")
                if not isinstance(digest, str) or len(digest) != 64:
                    raise RegistryError(f"{self._show(path)}: bad sha256 for {filename!r}")
            return ModelVersion(
                name=meta["name"],
                version=version,
                kind=meta["kind"],
                metrics=meta["metrics"],
                config=meta["config"],
                data_fingerprint=meta["data_fingerprint"],
                created_at=meta["created_at"],
                rayline_version=meta["rayline_version"],
                run=meta["run"],
                files=files,
                uri=self._show(f"{self._model_dir(name)}/{version}"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{self._show(path)}: corrupted metadata.json ({exc!r})") from None

    def resolve(self, name: str, ref: int | str = LATEST) -> int:
        """The version number that `ref` (number, numeric string, alias, `latest`) means."""
        store_files.check_name(name, "model name")
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"model {name!r} is not registered in {self.uri}")
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            version = int(ref)
            if version not in versions:
                raise RegistryError(f"model {name!r} has no version {version} (has {versions})")
            return version
        if ref == LATEST:
            return versions[-1]
        store_files.check_name(ref, "alias")
        path = self._alias_path(name, ref)
        try:
            raw = self._read(path)
        except FileNotFoundError:
            raise RegistryError(f"model {name!r} has no alias {ref!r}") from None
        entry = store_files.parse(raw, self._show(path), "alias file")
        version = entry.get("version") if isinstance(entry, dict) else None
        if type(version) is not int:  # not a bool, a float or a string of digits
            raise RegistryError(
                f"{self._show(path)}: corrupted alias file (version {version!r}, "
                "expected a whole number)"
            )
        if version not in versions:
            raise RegistryError(f"{self._show(path)}: alias points at missing version {version}")
        return version

    def read_file(self, model: ModelVersion, filename: str) -> bytes:
        """The bytes of one artifact file, checked against the hash in its metadata."""
        if filename not in model.files:
            raise RegistryError(f"{model.name} v{model.version} has no file {filename!r}")
        if filename == "metadata.json" or not NAME_PATTERN.match(filename):
            raise RegistryError(f"{model.name} v{model.version}: bad file name {filename!r}")
        path = f"{self._model_dir(model.name)}/{model.version}/{filename}"
        try:
            data = self._read(path, MAX_ARTIFACT_BYTES)
        except FileNotFoundError:
            raise RegistryError(f"{self._show(path)}: missing") from None
        if hashlib.sha256(data).hexdigest() != model.files[filename]:
            raise RegistryError(f"{self._show(path)}: contents do not match metadata.json's hash")
        return data

    def read_files(self, model: ModelVersion) -> dict[str, bytes]:
        """Every artifact file of a version, each checked as `read_file` does."""
        return {filename: self.read_file(model, filename) for filename in model.files}

    def versions(self, name: str) -> list[int]:
        """Complete versions of model `name`, ascending."""
        return sorted(self._versions_in(self._model_dir(name)))

    def names(self) -> list[str]:
        """Names of every registered model."""
        selector = pafs.FileSelector(f"{self.root}/models", allow_not_found=True)
        return sorted(
            info.base_name
            for info in self._list(selector)
            if info.type == pafs.FileType.Directory and NAME_PATTERN.match(info.base_name)
        )

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version for model `name` (including the derived `latest`); an alias
        that cannot be resolved is left out (`aliases_checked` says why)."""
        return self.aliases_checked(name)[0]

    def aliases_checked(self, name: str) -> tuple[dict[str, int], list[str]]:
        """(alias -> version, one line per alias that cannot be resolved)."""
        selector = pafs.FileSelector(f"{self._model_dir(name)}/aliases", allow_not_found=True)
        found, problems = {}, []
        for info in self._list(selector):
            if info.base_name.endswith(".json") and not info.base_name.startswith("."):
                alias = info.base_name[: -len(".json")]
                try:
                    found[alias] = self.resolve(name, alias)
                except RegistryError as exc:
                    problems.append(f"alias {alias!r}: {exc}")
        versions = self.versions(name)
        if versions:
            found[LATEST] = versions[-1]
        return found, problems

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every version of `name`, or of every model."""
        return [
            self.get(n, v) for n in ([name] if name else self.names()) for v in self.versions(n)
        ]

    # -- plumbing --------------------------------------------------------------------

    def _model_dir(self, name: str) -> str:
        return f"{self.root}/models/{name}"

    def _alias_path(self, name: str, alias: str) -> str:
        return f"{self._model_dir(name)}/aliases/{alias}.json"

    def _versions_in(self, model_dir: str, complete_only: bool = True) -> list[int]:
        selector = pafs.FileSelector(model_dir, allow_not_found=True)
        versions = [
            int(info.base_name)
            for info in self._list(selector)
            if info.type == pafs.FileType.Directory and info.base_name.isdigit()
        ]
        if not complete_only or self.is_local:  # local versions appear only when complete
            return versions
        infos = self.fs.get_file_info([f"{model_dir}/{v}/metadata.json" for v in versions])
        return [v for v, info in zip(versions, infos) if info.type == pafs.FileType.File]

    def _list(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        """A folder's entries. Another writer's atomic write renames its temporary file
        away while the folder is read, and the listing fails on the vanished entry
        (seen with four processes moving aliases at once): read it again."""
        for _ in range(4):
            try:
                return self.fs.get_file_info(selector)
            except FileNotFoundError:
                time.sleep(0.01)
        return self.fs.get_file_info(selector)

    def _check_writable(self) -> None:
        if self.read_only:
            raise RegistryError(f"store {self.uri} was opened read-only")

    def _write(self, path: str, data: bytes) -> None:
        atomic_write(self.fs, path, lambda out: out.write(data))

    def _read(self, path: str, limit: int = MAX_RECORD_BYTES) -> bytes:
        """The file's bytes; a RegistryError naming it for a file over `limit` bytes or,
        on a local store, reached through a symbolic link (the store's files are its own:
        a link can point anywhere on the machine)."""
        if self.is_local:
            self._refuse_links(path)
        try:
            with self.fs.open_input_stream(path) as stream:
                data = stream.read(limit + 1)
            if len(data) > limit:
                raise RegistryError(f"{self._show(path)}: over {limit} bytes")
            return data
        except (FileNotFoundError, pa.ArrowIOError) as exc:
            if (
                isinstance(exc, FileNotFoundError)
                or "not found" in str(exc).lower()
                or "No such file" in str(exc)
            ):
                raise FileNotFoundError(path) from None
            raise RegistryError(f"{self._show(path)}: cannot read ({exc})") from None

    def _refuse_links(self, path: str) -> None:
        """Every folder and the file from the store's root down to `path` is itself."""
        below = os.path.relpath(path, self.root).split(os.sep)
        if below[0] == "..":
            raise RegistryError(f"{path}: outside the store {self.uri}")
        current = self.root
        for part in below:
            current = os.path.join(current, part)
            if os.path.islink(current):
                raise RegistryError(f"{current}: a symbolic link; the store's files are its own")

    def redact(self, text: str) -> str:
        """`text` with the store's location replaced by `<store>`: what an answer over
        HTTP may say of a problem (the logs keep the whole message)."""
        for location in sorted({self._show(self.root), self.root, self.uri}, key=len, reverse=True):
            if location:
                text = text.replace(location, "<store>")
        return text

    def _show(self, path: str) -> str:
        return path if self.is_local else f"{self.uri.split('://')[0]}://{path}"
