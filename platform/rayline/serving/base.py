"""What every served model shares: the errors a predictor raises (turned into 4xx by the
app), the registry lookup that checks a model's kind, and `ServedKind`, how a family
declares a kind it serves. Families' predictor modules build on this; the Serve app asks
the families (rayline.family.served_kinds) which kinds exist."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rayline.store import ModelRegistry, ModelVersion


class BadInput(ValueError):
    """The request's content cannot be used; the message says what was expected."""


class TooLarge(BadInput):
    """The request asks for more work than its kind's stated limit (rows, images, pixels):
    refused before any of it is done (413, the message names the limit)."""


class NotFound(LookupError):
    """The request names a user, item or model that does not exist."""


@dataclasses.dataclass(frozen=True)
class ServedKind:
    """How a registry kind is served: its predictor, its HTTP routes and the requests
    that show them. The gateway mounts `routes()` and names no kind itself."""

    what: str
    """What a model of this kind is called in messages ("DQN policy")."""
    load: Callable[[ModelRegistry, str, Any], Any]
    """(registry, model name, version or alias) -> the predictor."""
    routes: Callable[[], Any]
    """() -> a FastAPI APIRouter whose routes reach the predictor through
    rayline.serving.http.ModelsDep (imported on use: training never loads FastAPI)."""
    examples: Callable[[str, str, ModelVersion, ModelRegistry], list[str]]
    """(base URL, model name, version, registry) -> curl lines for a person to try."""
    agreement: Callable[[str, Any, Any], dict[str, float]] | None = None
    """(method, serving answer, shadow answer) -> measures of how alike they are
    ("agreement" in [0, 1], or a difference): what shadow traffic records."""
    protocol: Callable[[], Any] | None = None
    """() -> the kind's rayline.serving.inference_protocol.KindProtocol (imported on
    use), its predictor answering `tensors()`: the Open Inference Protocol's routes."""
    exports: Callable[[], dict[str, Callable[[Any, str], list[str]]]] | None = None
    """() -> format -> (predictor, folder) -> the files written: `rayline models
    export` (rayline.export); the first format is the default."""


def share_equal(a: list, b: list) -> float:
    """The share of positions where two equally long answers agree (1.0 when empty)."""
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 1.0


def describe(version: ModelVersion) -> dict[str, Any]:
    return {
        "name": version.name,
        "version": version.version,
        "kind": version.kind,
        "metrics": version.metrics,
        "created_at": version.created_at,
    }


def registered(registry: ModelRegistry, name: str, ref: str | int, kind: str, what: str):
    """The version `ref` of model `name`, which must be of `kind` (else BadInput)."""
    version = registry.get(name, ref)
    if version.kind != kind:
        raise BadInput(f"model {name!r} is a {version.kind} model, not {what}")
    return version


def post_example(url: str, body: str) -> str:
    return f"curl -X POST {url} -H 'content-type: application/json' -d '{body}'"
