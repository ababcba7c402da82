"""User-based neighbourhood collaborative filtering.

The classic workflow (Resnick et al. 1994, GroupLens; Herlocker et al. 1999): find the
users whose ratings are most similar to this user's, predict a rating from what those
neighbours gave the item, and recommend the items the neighbours rated highly that this
user has not rated.

Similarity between users u and v, over their full rating vectors (missing = 0):
- `cosine`:  r_u . r_v / (|r_u| |r_v|)
- `pearson`: the same on mean-centred ratings (each user's mean subtracted from the
  ratings they gave), so a harsh and a generous rater with the same taste match.
Shrinkage damps similarities resting on few co-rated items: sim * n / (n + shrinkage).
Ranking weights neighbours by sim ** power (case amplification, Breese et al. 1998), so
the closest neighbours count most.

The neighbour search goes through the users in blocks whose dense similarity rows stay
under BLOCK_FLOATS values, whatever the number of users; with `workers` > 0 the blocks
are Ray tasks (the rating vectors go through the object store once), and every user's
neighbours are the same as in one process.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from rayline.recsys.base import Recommender, balanced_bounds, ray_map, top_k
from rayline.recsys.data import Ratings

BLOCK_FLOATS = 1 << 23
"""Similarity values computed at once (64 MB of float64, twice: similarities and
overlaps): the rows per block are BLOCK_FLOATS // n_users."""


def neighbor_block(
    vectors: sp.csr_matrix,
    norms: np.ndarray,
    binary: sp.csr_matrix,
    start: int,
    stop: int,
    pool: int,
    shrinkage: float,
    min_overlap: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The `pool` most similar users of users start..stop, most similar first, and their
    similarities; rows in chunks of at most BLOCK_FLOATS // n_users."""
    n_users = vectors.shape[0]
    rows = max(1, BLOCK_FLOATS // n_users)
    neighbors = np.zeros((stop - start, pool), dtype=np.int32)
    neighbor_sims = np.zeros((stop - start, pool), dtype=np.float32)
    for first in range(start, stop, rows):
        block = slice(first, min(first + rows, stop))
        sims = (vectors[block] @ vectors.T).toarray() / norms[block, None] / norms[None, :]
        overlap = (binary[block] @ binary.T).toarray()
        if shrinkage > 0:
            sims *= overlap / (overlap + shrinkage)
        sims[overlap < min_overlap] = 0.0
        sims[np.arange(sims.shape[0]), np.arange(block.start, block.stop)] = -np.inf  # not oneself
        out = slice(block.start - start, block.stop - start)
        neighbors[out], neighbor_sims[out] = top_k(sims, pool)
    return neighbors, neighbor_sims


class UserKNN(Recommender):
    """User-based kNN: rating prediction, top-k ranking and explanations."""

    kind = "user_knn"

    def __init__(
        self,
        similarity: Literal["cosine", "pearson"] = "pearson",
        k: int = 40,
        shrinkage: float = 10.0,
        min_overlap: int = 1,
        pool: int = 400,
        power: float = 1.0,
        workers: int = 0,
    ):
        super().__init__()
        if similarity not in ("cosine", "pearson"):
            raise ValueError(f"similarity: expected 'cosine' or 'pearson', got {similarity!r}")
        self.similarity, self.k, self.shrinkage = similarity, k, shrinkage
        self.min_overlap, self.pool, self.power = min_overlap, pool, power
        self.workers = workers
        self.user_means = np.zeros(0)
        self.neighbors = np.zeros((0, 0), dtype=np.int32)
        """Each user's most similar users, most similar first (the candidate pool)."""
        self.neighbor_sims = np.zeros((0, 0), dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {
            "similarity": self.similarity,
            "k": self.k,
            "shrinkage": self.shrinkage,
            "min_overlap": self.min_overlap,
            "pool": self.pool,
            "power": self.power,
            "workers": self.workers,
        }

    def _fit(self, train: Ratings) -> None:
        ratings = self.seen
        self.user_means, shared = self.search_inputs(ratings)
        if self.workers <= 0:
            parts = [neighbor_block(start=0, stop=ratings.shape[0], **shared)]
        else:
            ranges = balanced_bounds(ratings.indptr, self.workers)
            parts = ray_map(
                neighbor_block, [{"start": lo, "stop": hi} for lo, hi in ranges], **shared
            )
        self.neighbors = np.vstack([neighbors for neighbors, _ in parts])
        self.neighbor_sims = np.vstack([sims for _, sims in parts])

    def search_inputs(self, ratings: sp.csr_matrix) -> tuple[np.ndarray, dict[str, Any]]:
        """Each user's mean rating, and `neighbor_block`'s arguments but the range: the
        (mean-centred for pearson) rating vectors, their norms, who rated what, settings."""
        counts = np.diff(ratings.indptr)
        means = np.asarray(ratings.sum(axis=1)).ravel() / np.maximum(counts, 1)
        vectors = ratings.copy().astype(np.float64)
        if self.similarity == "pearson":
            vectors.data -= np.repeat(means, counts)
        norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return means, {
            "vectors": vectors,
            "norms": norms,
            "binary": (ratings > 0).astype(np.float64),
            "pool": min(self.pool, ratings.shape[0] - 1),
            "shrinkage": self.shrinkage,
            "min_overlap": self.min_overlap,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_means": self.user_means,
            "neighbors": self.neighbors,
            "neighbor_sims": self.neighbor_sims,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_means, self.neighbors, self.neighbor_sims = (
            arrays["user_means"],
            arrays["neighbors"],
            arrays["neighbor_sims"],
        )
        self._training_vectors()  # at load, not on a served request

    def similarities(self, user: int) -> dict[int, float]:
        """user -> {neighbour: similarity} over the candidate pool."""
        return dict(zip(self.neighbors[user].tolist(), self.neighbor_sims[user].tolist()))

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Per pair, the k most similar users (positive similarity) who rated the item:
        pearson: mean_u + sum sim (r_vi - mean_v) / sum |sim|; cosine: sum sim r_vi / sum sim.
        No such neighbour: the user's mean (global mean for an unknown user)."""
        users, items = np.asarray(users), np.asarray(items)
        out = np.full(len(users), self.global_mean, dtype=np.float64)
        known = (users >= 0) & (users < self.n_users)
        out[known] = self.user_means[users[known]]
        valid = known & (items >= 0) & (items < self.n_items)
        ratings = self.seen.tocsc()
        for user in np.unique(users[valid]):
            rows = np.nonzero(valid & (users == user))[0]
            neighbors, sims = self.neighbors[user], self.neighbor_sims[user].astype(np.float64)
            # Neighbour ratings of the asked items: (pool, pairs), 0 = not rated.
            given = ratings[:, items[rows]][neighbors].toarray()
            rated = (given > 0) & (sims[:, None] > 0)
            use = rated & (np.cumsum(rated, axis=0) <= self.k)  # first k raters, most similar first
            weights = np.where(use, sims[:, None], 0.0)
            total = weights.sum(axis=0)
            if self.similarity == "pearson":
                deviations = given - self.user_means[neighbors][:, None]
                estimate = self.user_means[user] + (weights * deviations).sum(axis=0) / np.maximum(
                    total, 1e-12
                )
            else:
                estimate = (weights * given).sum(axis=0) / np.maximum(total, 1e-12)
            out[rows] = np.where(total > 0, estimate, out[rows])
        return self.clip(out)

    def _neighbor_matrix(self, users: np.ndarray) -> sp.csr_matrix:
        k = min(self.k, self.neighbors.shape[1])
        sims = np.maximum(self.neighbor_sims[users, :k], 0.0) ** self.power
        cols = self.neighbors[users, :k]
        rows = np.repeat(np.arange(len(users)), k)
        return sp.csr_matrix((sims.ravel(), (rows, cols.ravel())), shape=(len(users), self.n_users))

    def score(self, users: np.ndarray) -> np.ndarray:
        """sum over the user's k nearest neighbours of similarity ** power x the
        neighbour's rating: high for items that similar users rated highly."""
        return (self._neighbor_matrix(np.asarray(users)) @ self.seen).toarray()

    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """The same workflow for someone not in training: their similarity to every
        training user, then the k nearest users' ratings weighted by similarity ** power."""
        ratings = np.asarray(ratings, dtype=np.float64)
        mine = np.zeros(self.n_items)
        mine[np.asarray(items)] = ratings - (
            ratings.mean() if self.similarity == "pearson" else 0.0
        )
        vectors, norms = self._training_vectors()
        sims = (vectors @ mine) / np.maximum(norms * max(np.linalg.norm(mine), 1e-12), 1e-12)
        if self.shrinkage > 0:
            overlap = np.asarray((self.seen[:, np.asarray(items)] > 0).sum(axis=1)).ravel()
            sims *= overlap / (overlap + self.shrinkage)
        nearest = np.argsort(-sims, kind="stable")[: self.k]
        weights = np.maximum(sims[nearest], 0.0) ** self.power
        return np.asarray(self.seen[nearest].T @ weights).ravel()

    def _training_vectors(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The training users' rating vectors as a new user is compared with them
        (mean-centred for pearson) and their norms: made once per loaded model, not per
        request (a served POST /recommend copied the whole ratings matrix each time)."""
        cached = getattr(self, "_vectors_and_norms", None)
        if cached is None:
            vectors = self.seen.astype(np.float64)
            if self.similarity == "pearson":
                vectors = vectors.copy()
                vectors.data -= np.repeat(self.user_means, np.diff(vectors.indptr))
            norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
            cached = self._vectors_and_norms = (vectors, norms)
        return cached

    def explain(self, user: int, items: list[int]) -> list[list[dict]]:
        """For each item, the neighbours behind recommending it to `user`: who, how
        similar, what they rated it, most similar first."""
        k = min(self.k, self.neighbors.shape[1])
        neighbors, sims = self.neighbors[user, :k], self.neighbor_sims[user, :k]
        given = self.seen[neighbors][
            :, items
        ].toarray()  # (k, items): one slice, not k x items lookups
        return [
            [
                {"user": int(v), "similarity": float(s), "rating": float(r)}
                for v, s, r in zip(neighbors, sims, given[:, column])
                if r > 0 and s > 0
            ]
            for column in range(len(items))
        ]

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items whose raters overlap with this item's: cosine over the rating columns."""
        columns = self.seen.tocsc()
        target = columns[:, item]
        sims = np.asarray((target.T @ columns).todense()).ravel()
        norms = np.sqrt(np.asarray(columns.multiply(columns).sum(axis=0)).ravel())
        sims = sims / np.maximum(norms * max(norms[item], 1e-12), 1e-12)
        sims[item] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        return top, sims[top]
