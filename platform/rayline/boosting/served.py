"""What the XGBoost family serves (rayline.family.SERVING): light to import; XGBoost is
imported when a replica loads a model."""

from __future__ import annotations

import json

import numpy as np

from rayline.serving.base import ServedKind, post_example, share_equal
from rayline.store import ModelRegistry, ModelVersion


def load(registry: ModelRegistry, name: str, ref):
    from rayline.boosting.predictor import BoostedService

    return BoostedService(registry, name, ref)


def _examples(url: str, name: str, version: ModelVersion, registry: ModelRegistry) -> list[str]:
    meta = json.loads(registry.read_file(version, "model.json"))
    row = json.dumps({"rows": [{feature: 0 for feature in meta["feature_names"]}]})
    return [post_example(f"{url}/xgboost/{name}/predict", row)]


def _agreement(method: str, a: dict, b: dict) -> dict[str, float]:
    """The mean absolute difference of the predictions (of the probabilities where the
    task has them), and for classification the share of rows given the same class."""
    values = "probabilities" if "probabilities" in a else "predictions"
    difference = np.abs(
        np.asarray(a[values], dtype=np.float64) - np.asarray(b[values], dtype=np.float64)
    )
    measures = {"mean_abs_difference": float(difference.mean())}
    if a["task"] != "regression":
        measures["agreement"] = share_equal(a["predictions"], b["predictions"])
    return measures


def routes():
    from rayline.boosting.routes import router

    return router()


def protocol():
    from rayline.boosting.routes import protocol

    return protocol()


def exports():
    from rayline.boosting.export import xgboost_json, xgboost_ubjson

    return {"xgboost-json": xgboost_json, "xgboost-ubjson": xgboost_ubjson}


SERVED = {
    "xgboost": ServedKind("XGBoost model", load, routes, _examples, _agreement, protocol, exports)
}
