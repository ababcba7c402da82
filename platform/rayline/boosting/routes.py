"""The XGBoost family's HTTP route: POST /xgboost/{model}/predict, rows of named
features -> predictions."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from rayline.serving.base import BadInput, TooLarge
from rayline.serving.http import ERRORS, Models, ModelsDep, json_response

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


async def infer(
    models: Models, model: str, inputs: dict, parameters: dict, version: int | None
) -> tuple[int, dict]:
    """The Open Inference Protocol's answer: features FP32 [N, F] (the model's feature
    order, a category as its index) -> predictions (INT64 classes, FP32 values) and, for
    classifiers, probabilities FP32."""
    features = inputs.get("features")
    if features is None or len(inputs) != 1:
        raise BadInput(f"inputs: expected one tensor, features (got {', '.join(inputs)})")
    if len(features) > MAX_ROWS:
        raise TooLarge(f"features: {len(features)} rows, at most {MAX_ROWS:,}")
    heavy = len(features) > HEAVY_ROWS
    version, answer = await models.call(
        model, "xgboost", "predict_features", features, heavy=heavy, version=version
    )
    regression = answer["task"] == "regression"
    outputs = {
        "predictions": np.asarray(
            answer["predictions"], dtype=np.float32 if regression else np.int64
        )
    }
    if "probabilities" in answer:
        outputs["probabilities"] = np.asarray(answer["probabilities"], dtype=np.float32)
    return version, outputs


def protocol():
    from rayline.serving.inference_protocol import KindProtocol

    return KindProtocol("rayline_xgboost", {"features": ("FP32",)}, infer)


def router() -> APIRouter:
    routes = APIRouter(tags=["xgboost"])

    @routes.post("/xgboost/{model}/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(model: str, body: PredictRequest, models: ModelsDep):
        heavy = len(body.rows) > HEAVY_ROWS
        version, answer = await models.call(model, "xgboost", "predict", body.rows, heavy=heavy)
        return json_response({"model": model, "version": version, **answer})

    return routes
