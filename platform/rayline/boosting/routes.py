"""The XGBoost family's HTTP route: POST /xgboost/{model}/predict, rows of named
features -> predictions."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from rayline.serving.http import ERRORS, ModelsDep, json_response

MAX_ROWS = 10_000
"""Rows in one request: more is refused by the schema (422) before any is read."""
HEAVY_ROWS = 1_000
"""A request of more rows runs on the model's heavy lane (rayline.serving.work)."""


class PredictRequest(BaseModel):
    rows: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_ROWS,
        description="rows of named features (at most 10,000); every feature named, null for "
        "a missing value; numbers within float32's range",
    )


class PredictResponse(BaseModel):
    model: str
    version: int
    task: str
    predictions: list[float]
    probabilities: list[Any] | None = None


def router() -> APIRouter:
    routes = APIRouter(tags=["xgboost"])

    @routes.post("/xgboost/{model}/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(model: str, body: PredictRequest, models: ModelsDep):
        heavy = len(body.rows) > HEAVY_ROWS
        version, answer = await models.call(model, "xgboost", "predict", body.rows, heavy=heavy)
        return json_response({"model": model, "version": version, **answer})

    return routes
