"""The XGBoost family's served model: rows of named features -> predictions
(POST /xgboost/{model}/predict)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rayline.boosting.model import BadRows, BoostedModel
from rayline.drift import drift_window
from rayline.serving.base import BadInput, registered
from rayline.store import ModelRegistry


class BoostedService:
    """A registered XGBoost model: rows of named features -> predictions."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        self.version = registered(registry, name, ref, "xgboost", "an XGBoost model")
        files = registry.read_files(self.version)
        self.model = BoostedModel.from_files(files)
        self.drift = drift_window(files)
        """What this replica served, against the rows it was trained on (rayline.drift)."""

    def predict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Binary: the class and P(class 1); multiclass: the class and every class's
        probability; regression: the value."""
        if not rows:
            raise BadInput("rows: expected at least one row")
        try:
            features = self.model.rows_to_features(rows)
        except BadRows as exc:
            raise BadInput(str(exc)) from None
        output = self.model.predict(features).astype(np.float64)
        if self.drift is not None:
            self.drift.add(features, self.model.answers(output))
        kind = self.model.task.kind
        result: dict[str, Any] = {"task": kind}
        if kind == "binary":
            result["predictions"] = (output > 0.5).astype(int).tolist()
            result["probabilities"] = output.tolist()
        elif kind == "multiclass":
            result["predictions"] = output.argmax(axis=1).tolist()
            result["probabilities"] = output.tolist()
        else:
            result["predictions"] = output.tolist()
        return result
