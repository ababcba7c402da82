"""XGBoost models out of rayline: XGBoost's own formats, which every XGBoost reads, cut
to the trees the served model uses (rayline.export)."""

from __future__ import annotations

import json
import os


def booster_files(service, folder: str, suffix: str) -> list[str]:
    """The served model's booster up to its best iteration (what the route predicts
    with) as `booster.<suffix>` (model.json is the export's description), and
    `features.json`: the feature names and types in column order, the categories, the
    task and how to read its output."""
    model = service.model
    booster = model.booster[: model.best_iteration + 1]
    name = f"booster.{suffix}"
    booster.save_model(os.path.join(folder, name))
    features = {
        "feature_names": model.feature_names,
        "feature_types": model.feature_types,
        "categories": model.categories,
        "task": {"kind": model.task.kind, "objective": model.task.objective},
        "output": {
            "binary": "P(class 1); the class is 1 above 0.5",
            "multiclass": "each class's probability; the class is the largest",
            "regression": "the value",
        }[model.task.kind],
    }
    with open(os.path.join(folder, "features.json"), "w") as f:
        json.dump(features, f, indent=2)
    return [name, "features.json"]


def xgboost_json(service, folder: str) -> list[str]:
    return booster_files(service, folder, "json")


def xgboost_ubjson(service, folder: str) -> list[str]:
    return booster_files(service, folder, "ubj")
