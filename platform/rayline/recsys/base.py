"""The one small interface every recommender implements, and its non-pickle storage.

fit / score / recommend / similar_items / save / load; `predict` for rating prediction.
A saved model is two files: `model.npz` (arrays, loaded with allow_pickle=False) and
`model.json` (kind and hyper-parameters).
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from rayline.recsys.data import Ratings

ARRAYS_FILE = "model.npz"
PARAMS_FILE = "model.json"

TOPK_BLOCK_FLOATS = 1 << 23
"""Scores held at once when ranking many users (64 MiB of float64): the users per block
are TOPK_BLOCK_FLOATS // n_items, whatever the number of users."""


def balanced_bounds(indptr: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of a CSR matrix with about the same work each, counting a
    row's work as its entries plus one (work follows the entries, not the rows, on skewed
    data); no empty range."""
    n_rows = len(indptr) - 1
    parts = min(parts, n_rows)
    if parts <= 1:
        return [(0, n_rows)]
    work = np.asarray(indptr, dtype=np.float64) + np.arange(n_rows + 1)
    targets = np.linspace(0, work[-1], parts + 1)[1:-1]
    cuts = np.searchsorted(work, targets, side="left")
    nearer_below = targets - work[cuts - 1] < work[cuts] - targets
    cuts = np.where(nearer_below, cuts - 1, cuts)
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_rows - 1), [n_rows]]))
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def ray_map(function: Callable, calls: list[dict[str, Any]], **shared: Any) -> list:
    """`function(**call, **shared)` for every call, as Ray tasks of one CPU each, results
    in call order. `shared` goes through the object store once, not once per task."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{function.__name__} with workers > 0 runs on Ray: call ray.init first")
    task = ray.remote(num_cpus=1)(function)
    shared_refs = {name: ray.put(value) for name, value in shared.items()}
    return ray.get([task.remote(**call, **shared_refs) for call in calls])


def recommend_rows(
    model: Recommender, start: int, stop: int, k: int, candidates: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """`model.recommend` for users start..stop, in blocks of bounded memory."""
    rows = max(1, TOPK_BLOCK_FLOATS // max(1, model.n_items))
    return _stacked(
        [
            model.recommend(np.arange(lo, min(lo + rows, stop)), k, candidates=candidates)
            for lo in range(start, stop, rows)
        ]
    )


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest scores and their columns, best first (equal scores: lower
    column first; which of several equal scores at the cut is kept is torch's choice).
    torch.topk on the same values, so exact, at ~10x np.argpartition's speed on a
    27k-item row, where argpartition took most of the time of every user's top-k."""
    k = min(k, scores.shape[1])
    top_scores, top = torch.topk(torch.from_numpy(scores), k, dim=1)
    top_scores, top = top_scores.numpy(), top.numpy()
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


def _stacked(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(top items, scores) of consecutive user ranges, as one pair."""
    return np.vstack([top for top, _ in parts]), np.vstack([scores for _, scores in parts])


class Recommender(ABC):
    """Base class: subclasses fit on dense-id Ratings and score items for users."""

    kind: ClassVar[str]
    rating_range: tuple[float, float] = (0.5, 5.0)

    def __init__(self) -> None:
        self.seen: sp.csr_matrix | None = None
        self.global_mean = 0.0
        self.user_ids = np.zeros(0)
        self.item_ids = np.zeros(0)

    # -- what subclasses implement ---------------------------------------------------

    @abstractmethod
    def _fit(self, train: Ratings) -> None: ...

    @abstractmethod
    def score(self, users: np.ndarray) -> np.ndarray:
        """Ranking scores, (len(users), n_items), higher is better: a new array (callers
        may write to it) or a read-only view."""

    @abstractmethod
    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for (user, item) pairs; -1 marks a user or item unseen in
        training, which gets the model's fallback."""

    @abstractmethod
    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """Ranking scores over all items for someone not in training, from the items they
        rated (dense indices) and their ratings; no retraining."""

    @abstractmethod
    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k items most similar to `item` (excluding it) and their similarities."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Hyper-parameters, enough to rebuild the model with `cls(**params)`."""

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Learned state as named numpy arrays."""

    @abstractmethod
    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...

    # -- shared behaviour ------------------------------------------------------------

    def fit(self, train: Ratings) -> Recommender:
        if len(train) == 0:
            raise ValueError("cannot fit a recommender on no ratings")
        self.seen = train.matrix()
        self.global_mean = float(train.ratings.mean())
        self.user_ids, self.item_ids = train.user_ids, train.item_ids
        self._fit(train)
        return self

    @property
    def n_users(self) -> int:
        return self.seen.shape[0]

    @property
    def n_items(self) -> int:
        return self.seen.shape[1]

    def recommend(
        self,
        users: np.ndarray,
        k: int = 10,
        exclude_seen: bool = True,
        candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores per user, best first; items the user rated in
        training are left out, and only `candidates` (a boolean item mask) are ranked."""
        users = np.atleast_1d(np.asarray(users))
        scores = self.score(users)
        if not scores.flags.writeable:  # score() returns a fresh array, or a read-only view
            scores = scores.copy()
        if candidates is not None:
            scores[:, np.flatnonzero(~candidates)] = -np.inf
        if exclude_seen:
            seen = self.seen[users]
            rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
            scores[rows, seen.indices] = -np.inf
        return top_k(scores, k)

    def recommend_all(
        self, k: int = 10, candidates: np.ndarray | None = None, workers: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every user's top-k (as `recommend`), in blocks of users whose scores stay under
        TOPK_BLOCK_FLOATS values; with `workers` > 0 the users are split into that many
        ranges, each a Ray task (the model goes through the object store once)."""
        if workers <= 0:
            return recommend_rows(self, 0, self.n_users, k, candidates)
        parts = ray_map(
            recommend_rows,
            [{"start": lo, "stop": hi} for lo, hi in balanced_bounds(self.seen.indptr, workers)],
            model=self,
            k=k,
            candidates=candidates,
        )
        return _stacked(parts)

    def clip(self, predictions: np.ndarray) -> np.ndarray:
        return np.clip(predictions, *self.rating_range)

    def save(self) -> dict[str, bytes]:
        """The model as files for the registry: npz arrays + JSON params."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            **self.arrays(),
            seen_data=self.seen.data,
            seen_indices=self.seen.indices,
            seen_indptr=self.seen.indptr,
            user_ids=self.user_ids,
            item_ids=self.item_ids,
        )
        meta = {
            "kind": self.kind,
            "params": self.params(),
            "global_mean": self.global_mean,
            "shape": list(self.seen.shape),
            "rating_range": list(self.rating_range),
        }
        return {ARRAYS_FILE: buffer.getvalue(), PARAMS_FILE: json.dumps(meta).encode()}
