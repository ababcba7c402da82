"""What a family's HTTP routes build on: strict number types, the error answers every
route documents, one JSON encoding, and `Models`, the replica's view of the models it
serves, which a route receives as a FastAPI dependency (`ModelsDep`).

A family declares each kind it serves with a `routes()` that returns an `APIRouter`
(rayline.serving.base.ServedKind); the gateway mounts every router the families declare.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from rayline.numbers import FLOAT32_MAX
from rayline.serving.base import BadInput, TooLarge

MAX_K = 1000
"""The most items, classes or neighbours one request may ask for."""

Float32 = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""A JSON number that is a finite float32: no strings, no booleans, no 1e300."""


class ErrorBody(BaseModel):
    detail: Any = Field(description="what was wrong: a message, or the fields that were")


ERRORS = {
    400: {"model": ErrorBody, "description": "the input cannot be used (the message says why)"},
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key header"},
    404: {"model": ErrorBody, "description": "no such model, user or item"},
    413: {"model": ErrorBody, "description": "the request body is over the limit"},
    422: {"model": ErrorBody, "description": "the body does not match the request schema"},
    503: {
        "model": ErrorBody,
        "description": "not ready yet (loading its models), or the model's threads and queue "
        "are full; retry after the Retry-After header's seconds",
    },
    504: {"model": ErrorBody, "description": "no answer within the request timeout"},
}
"""Every error a route can answer, for the OpenAPI document."""


def refused(exc: BadInput) -> HTTPException:
    """The answer to input a predictor or a route's check refused: 413 when it asks for
    more work than its kind's limits (TooLarge), else 400; the message names what."""
    return HTTPException(status_code=413 if isinstance(exc, TooLarge) else 400, detail=str(exc))


def json_response(
    content: Any, status_code: int = 200, retry_after_s: int | None = None
) -> Response:
    """Encoded once with the json module: FastAPI's default path walks the answer with
    jsonable_encoder first, which costs more than the prediction for the larger answers."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return Response(
        json.dumps(content).encode(),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


class Models(Protocol):
    """The models one gateway replica serves, as its routes use them."""

    batching: bool
    """Whether routes may answer concurrent requests together (ServeArgs.batching)."""

    def local(
        self, name: str | None, kind: str, key: str | None = None, version: int | None = None
    ) -> Any | None:
        """The predictor of model `name` held in this replica, serving or canary: the
        `version` asked for (an Open Inference Protocol route's: 404 when it is not
        served now), else by the canary split (by a hash of `key` where the route has
        one, else at random); None when it is held in a deployment of its own (use
        `call`). Unknown or unloadable: a 404 naming the models of that kind that are
        served."""

    async def call(
        self,
        name: str | None,
        kind: str,
        method: str,
        *args,
        key: str | None = None,
        heavy: bool = False,
        version: int | None = None,
    ) -> tuple[int, Any]:
        """(version, answer) of the predictor's `method`, wherever it is held (chosen as
        `local` does), within the request timeout (BadInput -> 400, TooLarge -> 413,
        NotFound -> 404, timeout -> 504, the model's lane full -> 503). `heavy`: the
        route counted this request as expensive (rayline.serving.work's heavy lane)."""

    def shadow(self, name: str, method: str, args: tuple, answer: Any) -> None:
        """For a shadowed model, the same `method(*args)` on its canary in the
        background, compared with `answer` (what a route that used `local` answered);
        `call` does this itself."""

    async def run(self, key: str, function: Callable, *args, heavy: bool = False) -> Any:
        """`function(*args)` in the worker threads of `key` (a model's name: each model
        has its own, rayline.serving.work), with `call`'s timeout and errors; 503 with
        Retry-After when that model's threads and queue are full."""

    async def answer(self, awaitable: Awaitable) -> Any:
        """The awaited answer with `call`'s timeout and errors."""

    def batcher(self, key: str, compute: Callable[[list], Awaitable[list]], max_batch: int) -> Any:
        """This replica's `Batcher` named `key` (made on first use): `await
        batcher.submit(item)` shares one `compute(items)` with concurrent requests."""

    def default(self, kind: str) -> str | None:
        """The model a route of `kind` answers with when the request names none."""

    def kind_of(self, name: str) -> str | None:
        """The kind of model `name` the app serves (None: not one of its models)."""

    def names(self) -> list[str]:
        """Every model the app was given, served or refused."""

    def served_versions(self, name: str) -> list[int]:
        """The versions of `name` answering now: the serving one and the canary."""

    def ready(self) -> bool:
        """Whether this replica has loaded its models."""


async def replica_models(request: Request) -> Models:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on
    # every request (half the gateway's throughput, docs/benchmarks.md).
    # (tests/test_serving.py checks that no dependency or route is a plain `def`.)
    return request.app.state.models


ModelsDep = Annotated[Models, Depends(replica_models)]
"""A route's parameter `models: ModelsDep` is the replica's `Models`."""
