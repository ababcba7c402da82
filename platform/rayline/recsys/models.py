"""The recommender models by kind, the most-popular baseline, and `load`, which
rebuilds a saved model of any kind (never unpickling)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import scipy.sparse as sp

from rayline.recsys.als import ALS
from rayline.recsys.base import ARRAYS_FILE, PARAMS_FILE, Recommender
from rayline.recsys.data import Ratings
from rayline.recsys.ease import EASE
from rayline.recsys.knn import UserKNN


class MostPopular(Recommender):
    """Ranks items by how many users rated them; predicts damped item means."""

    kind = "popular"

    def __init__(self, damping: float = 5.0):
        super().__init__()
        self.damping = damping
        self.popularity = np.zeros(0)
        self.item_means = np.zeros(0)

    def params(self) -> dict[str, Any]:
        return {"damping": self.damping}

    def _fit(self, train: Ratings) -> None:
        counts = np.bincount(train.items, minlength=train.n_items).astype(np.float64)
        sums = np.bincount(train.items, weights=train.ratings, minlength=train.n_items)
        self.popularity = counts
        # Shrink towards the global mean: an item with 1 rating of 5 is not the best item.
        self.item_means = (sums + self.damping * self.global_mean) / (counts + self.damping)

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(np.atleast_1d(users)), self.n_items))

    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        return self.popularity.copy()

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        items = np.asarray(items)
        known = (items >= 0) & (items < self.n_items)
        out = np.full(len(items), self.global_mean)
        out[known] = self.item_means[items[known]]
        return self.clip(out)

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Without co-rating information: the most popular other items."""
        order = [i for i in np.argsort(-self.popularity, kind="stable")[: k + 1] if i != item][:k]
        return np.asarray(order), self.popularity[order]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"popularity": self.popularity, "item_means": self.item_means}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.popularity, self.item_means = arrays["popularity"], arrays["item_means"]


MODELS: dict[str, type[Recommender]] = {m.kind: m for m in (MostPopular, UserKNN, ALS, EASE)}


def load(files: dict[str, bytes]) -> Recommender:
    """Rebuild a saved recommender; never unpickles."""
    meta = json.loads(files[PARAMS_FILE])
    if meta["kind"] not in MODELS:
        raise ValueError(f"unknown recommender kind {meta['kind']!r}")
    model = MODELS[meta["kind"]](**meta["params"])
    with np.load(io.BytesIO(files[ARRAYS_FILE]), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    model.seen = sp.csr_matrix(
        (arrays.pop("seen_data"), arrays.pop("seen_indices"), arrays.pop("seen_indptr")),
        shape=tuple(meta["shape"]),
    )
    model.user_ids, model.item_ids = arrays.pop("user_ids"), arrays.pop("item_ids")
    model.global_mean = meta["global_mean"]
    model.rating_range = tuple(meta["rating_range"])
    model.load_arrays(arrays)
    return model
