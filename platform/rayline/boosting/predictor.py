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
        return self._predicted(features)

    def predict_features(self, features: np.ndarray) -> dict[str, Any]:
        """`predict` for a float32 matrix whose columns are the model's features in
        order, a categorical one as its category's index (the Open Inference Protocol's
        tensor; its numbers checked already)."""
        names = self.model.feature_names
        if features.ndim != 2 or features.shape[1] != len(names) or not len(features):
            raise BadInput(
                f"features: expected shape [N, {len(names)}] (columns {', '.join(names)}), "
                f"got {list(features.shape)}"
            )
        for name, categories in self.model.categories.items():
            column = features[:, names.index(name)]
            bad = (column != np.round(column)) | (column < 0) | (column >= len(categories))
            if bad.any():
                raise BadInput(
                    f"features[{int(np.flatnonzero(bad)[0])}].{name}: expected a category's "
                    f"index, 0 to {len(categories) - 1}"
                )
        return self._predicted(features.astype(np.float32, copy=False))

    def tensors(self) -> tuple[list, list]:
        """The Open Inference Protocol's inputs and outputs (rayline.boosting.routes)."""
        from rayline.serving.inference_protocol import TensorSpec

        names = self.model.feature_names
        described = {"feature_names": list(names)}
        if self.model.categories:  # a category is sent as its index in this list
            described["categories"] = {n: list(c) for n, c in self.model.categories.items()}
        features = TensorSpec("features", "FP32", (-1, len(names)), described)
        kind = self.model.task.kind
        if kind == "regression":
            return [features], [TensorSpec("predictions", "FP32", (-1,))]
        predictions = TensorSpec("predictions", "INT64", (-1,))
        shape = (-1,) if kind == "binary" else (-1, self.model.task.num_class)
        return [features], [predictions, TensorSpec("probabilities", "FP32", shape)]

    def _predicted(self, features: np.ndarray) -> dict[str, Any]:
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
