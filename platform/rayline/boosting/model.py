"""A trained booster with what predicting needs: its task, feature names and types,
category codes and the best round. Saved as XGBoost UBJSON plus a JSON description,
never pickle, so a model file from anywhere is safe to load."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rayline.boosting.data import Table, Task
from rayline.numbers import float32_problem

MODEL_FILE = "model.ubj"
META_FILE = "model.json"
IMPORTANCE_FILE = "importance.png"


class BadRows(ValueError):
    """Rows to predict on that do not fit the model; the message names the problem."""


@dataclasses.dataclass
class BoostedModel:
    booster: Any
    """xgboost.Booster"""
    task: Task
    feature_names: list[str]
    feature_types: list[str]
    categories: dict[str, list[str]]
    best_iteration: int
    """0-based round with the best validation loss; predictions use rounds 0..best."""
    rounds: int
    """Rounds trained (the final model)."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class-1 probability (binary), class probabilities (multiclass) or values."""
        import xgboost as xgb

        matrix = xgb.DMatrix(
            features,
            feature_names=self.feature_names,
            feature_types=self.feature_types,
            enable_categorical=bool(self.categories),
            nthread=1,
        )
        return self.booster.predict(matrix, iteration_range=(0, self.best_iteration + 1))

    def answers(self, output: np.ndarray) -> np.ndarray:
        """What `predict`'s output answers per row: the class (binary, multiclass) or the
        value (regression), as drift compares them."""
        if self.task.kind == "binary":
            return (output > 0.5).astype(np.int64)
        if self.task.kind == "multiclass":
            return output.argmax(axis=1)
        return output

    def profile(self, features: np.ndarray) -> dict:
        """The reference profile of these rows and this model's answers to them
        (rayline.drift), stored at registration."""
        from rayline.drift import build_profile

        classes = {"binary": [0, 1], "multiclass": list(range(self.task.num_class))}
        answers = self.answers(self.predict(features))
        return build_profile(features, self.feature_names, answers, classes.get(self.task.kind))

    def score(self, table: Table) -> dict[str, float]:
        """The task's metrics on `table`, at the best round."""
        from rayline.boosting.metrics import METRICS  # scikit-learn: 1.2 s a server skips

        prediction = self.predict(table.features)
        return {name: METRICS[name](table.label, prediction) for name in self.task.eval_metrics}

    def importance(self) -> dict[str, float]:
        """Total gain of the splits on each feature (0 for features never split on)."""
        gain = self.booster.get_score(importance_type="total_gain")
        return {name: float(gain.get(name, 0.0)) for name in self.feature_names}

    def rows_to_features(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """JSON rows of named features -> the feature matrix. Every feature must be named
        (null means missing); unknown names, infinities and unseen categories are refused."""
        expected = set(self.feature_names)
        features = np.empty((len(rows), len(self.feature_names)), dtype=np.float32)
        for i, row in enumerate(rows):
            unknown = sorted(set(row) - expected)
            if unknown:
                raise BadRows(f"rows[{i}]: unknown feature {unknown[0]!r}")
            missing = [n for n in self.feature_names if n not in row]
            if missing:
                raise BadRows(
                    f"rows[{i}]: missing feature {missing[0]!r} "
                    f"({len(missing)} of {len(self.feature_names)} missing; use null for unknown)"
                )
            for j, name in enumerate(self.feature_names):
                features[i, j] = self._value(row[name], name, i)
        return features

    def _value(self, value: Any, name: str, row: int) -> float:
        if value is None:
            return math.nan
        if name in self.categories:
            if not isinstance(value, str) or value not in self.categories[name]:
                raise BadRows(
                    f"rows[{row}].{name}: expected one of the categories "
                    f"{self.categories[name][:10]}, got {value!r}"
                )
            return float(self.categories[name].index(value))
        problem = float32_problem(value)  # the booster computes in float32
        if problem:
            raise BadRows(f"rows[{row}].{name}: {problem} (or null for a missing value)")
        return float(value)

    def files(self, extra: Mapping[str, Any] | None = None) -> dict[str, bytes]:
        """model.ubj, model.json and the importance chart, for a checkpoint or registry."""
        meta = {
            "task": dataclasses.asdict(self.task),
            "feature_names": self.feature_names,
            "feature_types": self.feature_types,
            "categories": self.categories,
            "best_iteration": self.best_iteration,
            "rounds": self.rounds,
            "importance_gain": self.importance(),
            **(extra or {}),
        }
        return {
            MODEL_FILE: bytes(self.booster.save_raw(raw_format="ubj")),
            META_FILE: json.dumps(meta, indent=1).encode(),
            IMPORTANCE_FILE: importance_chart(meta["importance_gain"]),
        }

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> BoostedModel:
        import xgboost as xgb

        meta = json.loads(files[META_FILE])
        booster = xgb.Booster(params={"nthread": 1})
        booster.load_model(bytearray(files[MODEL_FILE]))
        return cls(
            booster,
            Task(**meta["task"]),
            meta["feature_names"],
            meta["feature_types"],
            meta["categories"],
            int(meta["best_iteration"]),
            int(meta["rounds"]),
        )


def importance_chart(importance: Mapping[str, float], top: int = 20) -> bytes:
    """A PNG bar chart of the `top` features by gain, drawn with Pillow."""
    from PIL import Image, ImageDraw

    ranked = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:top]
    row_height, label_width, bar_width, margin = 18, 220, 360, 10
    height = margin * 2 + row_height * (len(ranked) + 1)
    image = Image.new("RGB", (label_width + bar_width + 2 * margin + 80, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin), f"feature importance (total gain), top {len(ranked)}", fill="black")
    largest = max((gain for _, gain in ranked), default=0.0) or 1.0
    for i, (name, gain) in enumerate(ranked, start=1):
        y = margin + i * row_height
        draw.text((margin, y + 2), name[:34], fill="black")
        length = int(bar_width * gain / largest)
        draw.rectangle(
            (label_width, y + 3, label_width + max(length, 1), y + row_height - 3), fill="#3b75af"
        )
        draw.text((label_width + length + 4, y + 2), f"{gain:.4g}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
