"""The recommender family's HTTP routes:

    GET  /recommend/{user_id}?k=10   top-k for a known user (cold-start answer otherwise)
    POST /recommend                  a new user's ratings -> top-k, without retraining
    GET  /items/{item_id}/similar    items like this one

`?model=` names the recommender; without it, the first served one answers. Concurrent
top-k requests are answered and encoded in one hop to each model's worker threads."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import functools
import json

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

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
    """(service, user_id, k) calls answered and encoded, each model's users scored
    together in one hop to its worker threads."""

    def answer_encoded(service, requests: list) -> list[bytes]:
        return [json.dumps(answer).encode() for answer in service.recommend_many(requests)]

    answers: list = [None] * len(calls)
    by_service: dict[int, list[int]] = {}
    for position, (service, _, _) in enumerate(calls):
        by_service.setdefault(id(service), []).append(position)
    for positions in by_service.values():
        service = calls[positions[0]][0]
        requests = [calls[p][1:] for p in positions]
        encoded = await models.run(service.version.name, answer_encoded, service, requests)
        for position, answer in zip(positions, encoded):
            answers[position] = answer
    return answers


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
