"""`rayline models export NAME [REF] DIR [--format F]`: a registered model in a standard
format that gives the answers rayline serves, so that it can leave rayline (ONNX Runtime,
Triton, a mobile runtime, XGBoost itself).

Each family declares the formats its kinds export to (`ServedKind.exports`); the exporter
works from the served predictor, so what is exported is what is served. Beside the files,
`model.json`: name, version, kind, format, the files, inputs and outputs as the Open
Inference Protocol describes them (rayline.serving.inference_protocol), the registration's
metrics and data fingerprint, and the export's own fingerprint (SHA-256 over its files).
The folder is written whole or not at all (a staging folder beside it, renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from rayline.config import ConfigError
from rayline.store import ModelRegistry

EXPORT_FILE = "model.json"


def export_model(
    registry: ModelRegistry, name: str, ref: str, directory: str, fmt: str | None
) -> dict:
    """Export version `ref` of `name` into `directory` (new or empty); its model.json.
    ConfigError for a kind or format with no export and a folder that cannot be written;
    RegistryError for an unknown model or version."""
    from rayline.family import served_kinds

    version = registry.get(name, ref)
    served = served_kinds().get(version.kind)
    exporters = served.exports() if served is not None and served.exports else {}
    if not exporters:
        raise ConfigError(f"{name} v{version.version}: a {version.kind} model has no export yet")
    fmt = fmt or next(iter(exporters))
    if fmt not in exporters:
        raise ConfigError(
            f"--format {fmt}: a {version.kind} model exports as {', '.join(exporters)}"
        )
    target = os.path.abspath(directory)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConfigError(f"{directory}: not an empty folder (an export never overwrites)")
    staging = f"{target}.partial-{os.getpid()}"
    try:
        os.makedirs(staging)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot be written ({exc.strerror})") from None
    try:
        predictor = served.load(registry, name, version.version)
        try:
            files = exporters[fmt](predictor, staging)
        except ModuleNotFoundError as exc:  # an optional dependency of the format
            raise ConfigError(
                f"--format {fmt}: needs {exc.name}, which is not installed "
                "(pip install 'rayline[export]')"
            ) from None
        inputs, outputs = predictor.tensors()
        digest = hashlib.sha256()
        for file in sorted(files):
            with open(os.path.join(staging, file), "rb") as f:
                digest.update(file.encode() + b"\0" + f.read())
        described = {
            "name": name,
            "version": version.version,
            "kind": version.kind,
            "format": fmt,
            "files": sorted(files),
            "inputs": [spec.metadata() for spec in inputs],
            "outputs": [spec.metadata() for spec in outputs],
            "metrics": version.metrics,
            "data_fingerprint": version.data_fingerprint,
            "export_fingerprint": digest.hexdigest(),
        }
        with open(os.path.join(staging, EXPORT_FILE), "w") as f:
            json.dump(described, f, indent=2, sort_keys=True)
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return described
