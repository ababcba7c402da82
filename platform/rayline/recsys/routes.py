"""The recommender family's HTTP routes:

    GET  /recommend/{user_id}?k=10   top-k for a known user (cold-start answer otherwise)
    POST /recommend                  a new user's ratings -> top-k, without retraining
    GET  /items/{item_id}/similar    items like this one

`?model=` names the recommender; without it, the first served one answers. Concurrent
top-k requests are answered and encoded in one hop to each model's worker threads."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import functools
import json

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from rayline.serving.base import BadInput, TooLarge
from rayline.serving.http import ERRORS, MAX_K, Float32, Models, ModelsDep, json_response

KIND = "recommender"


MAX_RATINGS = 10_000
"""Ratings of a new user in one request: more is refused by the schema (422)."""
HEAVY_RATINGS = 1_000
"""A new user with more ratings runs on the model's heavy lane (rayline.serving.work)."""


class RatingsRequest(BaseModel):
    ratings: dict[str, Float32] = Field(
        min_length=1,
        max_length=MAX_RATINGS,
        description="item id -> rating, for a user not in training (at most 10,000)",
    )
    k: int = Field(10, ge=1, le=MAX_K)


async def recommend_batch(models: Models, calls: list) -> list:
    """(service, user_id, k) calls answered and encoded: one hop to a model's worker
    threads for all of its calls, each version's users scored together (a canary split
    puts two versions in most batches; a hop each cost the split 4 % at concurrency 8)."""

    def answer_encoded(groups: list) -> list[list[bytes]]:
        return [
            [json.dumps(answer).encode() for answer in service.recommend_many(requests)]
            for service, requests in groups
        ]

    by_model: dict[str, dict[int, list[int]]] = {}
    for position, (service, _, _) in enumerate(calls):
        versions = by_model.setdefault(service.version.name, {})
        versions.setdefault(id(service), []).append(position)
    answers: list = [None] * len(calls)
    for name, versions in by_model.items():
        groups = [
            (calls[positions[0]][0], [calls[p][1:] for p in positions])
            for positions in versions.values()
        ]
        encoded = await models.run(name, answer_encoded, groups)
        for positions, group_answers in zip(versions.values(), encoded):
            for position, answer in zip(positions, group_answers):
                answers[position] = answer
    return answers


MAX_PROTOCOL_USERS = 1_000
"""Users in one Open Inference Protocol request."""


async def infer(
    models: Models, model: str, inputs: dict, parameters: dict, version: int | None
) -> tuple[int, dict]:
    """The Open Inference Protocol's answer: user_ids BYTES [N] and the parameter k ->
    item_ids BYTES [N, k] and scores FP32 [N, k] (a user with fewer than k unseen items:
    padded with "" and 0), and cold_start BOOL [N]. The batch goes to one version, split
    by its first user."""
    users = inputs.get("user_ids")
    if users is None or len(inputs) != 1 or users.ndim != 1 or users.dtype != object:
        raise BadInput("inputs: expected one tensor, user_ids, BYTES of shape [N]")
    if len(users) > MAX_PROTOCOL_USERS:
        raise TooLarge(f"user_ids: {len(users)} users, at most {MAX_PROTOCOL_USERS:,}")
    k = parameters.get("k", 10)
    if type(k) is not int or not 1 <= k <= MAX_K:
        raise BadInput(f"parameters.k: expected a whole number from 1 to {MAX_K}, got {k!r}")
    calls = [(str(user), k) for user in users]
    version, answers = await models.call(
        model,
        KIND,
        "recommend_many",
        calls,
        key=calls[0][0],
        heavy=len(calls) > 64,
        version=version,
    )
    item_ids = np.full((len(calls), k), "", dtype=object)
    scores = np.zeros((len(calls), k), dtype=np.float32)
    for row, answer in enumerate(answers):
        for column, item in enumerate(answer["items"]):
            item_ids[row, column], scores[row, column] = item["item_id"], item["score"]
    cold = np.array([bool(answer.get("cold_start")) for answer in answers])
    return version, {"item_ids": item_ids, "scores": scores, "cold_start": cold}


def protocol():
    from rayline.serving.inference_protocol import KindProtocol

    return KindProtocol("rayline_recommender", {"user_ids": ("BYTES",)}, infer)


def router() -> APIRouter:
    routes = APIRouter(tags=["recommender"])

    @routes.get("/recommend/{user_id}", responses=ERRORS)
    async def recommend(
        user_id: str,
        models: ModelsDep,
        k: int = Query(10, ge=1, le=MAX_K),
        model: str | None = None,
    ):
        name = model or models.default(KIND)
        # Keyed by the user: a canary split sends one user to one version every time.
        service = models.local(name, KIND, key=user_id) if models.batching else None
        if service is None:
            _, answer = await models.call(name, KIND, "recommend", user_id, k, key=user_id)
            return json_response(answer)
        batcher = models.batcher(KIND, functools.partial(recommend_batch, models), max_batch=16)
        encoded = await models.answer(batcher.submit((service, user_id, k)))
        models.shadow(name, "recommend", (user_id, k), encoded)
        return Response(encoded, media_type="application/json")

    @routes.post("/recommend", responses=ERRORS)
    async def recommend_new(body: RatingsRequest, models: ModelsDep, model: str | None = None):
        name = model or models.default(KIND)
        heavy = len(body.ratings) > HEAVY_RATINGS
        _, answer = await models.call(
            name, KIND, "recommend_new", body.ratings, body.k, heavy=heavy
        )
        return json_response(answer)

    @routes.get("/items/{item_id}/similar", responses=ERRORS)
    async def similar(
        item_id: str,
        models: ModelsDep,
        k: int = Query(10, ge=1, le=MAX_K),
        model: str | None = None,
    ):
        name = model or models.default(KIND)
        _, answer = await models.call(name, KIND, "similar", item_id, k)
        return json_response(answer)

    return routes
