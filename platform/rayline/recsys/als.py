"""Matrix factorisation by alternating least squares, parallel on Ray.

Explicit ratings: r_ui ~ mu + b_u + b_i + p_u . q_i, each row solved as ridge regression
with weight lambda * n_u (ALS-WR, Zhou et al. 2008, https://doi.org/10.1007/978-3-540-68880-8_32).
Implicit feedback: Hu, Koren & Volinsky 2008 (http://yifanhu.net/PUB/cf.pdf): every
(user, item) has preference 1 if observed else 0, with confidence 1 + alpha * r_ui.

With `workers` > 0 each half-step splits the rows into that many blocks, solved as Ray
tasks that read the fixed side's factors from the object store: the same code runs on
a laptop and on a cluster, and every row's solve is independent of the split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from rayline.recsys.base import Recommender
from rayline.recsys.data import Ratings


def solve_rows(
    matrix: sp.csr_matrix,
    fixed: np.ndarray,
    fixed_bias: np.ndarray,
    offset: float,
    regularization: float,
    implicit: bool,
    alpha: float,
) -> np.ndarray:
    """Solve every row of `matrix` against the fixed side's factors.

    Explicit: returns (rows, f + 1) = [factors, bias], a ridge fit of r - offset - fixed_bias
    on the fixed side augmented with a constant 1 column (the bias), weight lambda * n_row.
    Implicit: returns (rows, f) solving (Y'Y + Y'(C - I)Y + lambda I) x = Y'C p.
    """
    n_rows, f = matrix.shape[0], fixed.shape[1]
    if implicit:
        features_all, base = fixed, fixed.T @ fixed + regularization * np.eye(f)
    else:
        features_all, base = np.hstack([fixed, np.ones((len(fixed), 1))]), None
    out = np.zeros((n_rows, features_all.shape[1]))
    eye = np.eye(features_all.shape[1])
    for row in range(n_rows):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        if start == end:
            continue
        cols, values = matrix.indices[start:end], matrix.data[start:end]
        features = features_all[cols]
        if implicit:
            confidence = 1.0 + alpha * values
            a = base + features.T @ ((confidence - 1.0)[:, None] * features)
            b = features.T @ confidence
        else:
            a = features.T @ features + regularization * (end - start) * eye
            b = features.T @ (values - offset - fixed_bias[cols])
        out[row] = np.linalg.solve(a, b)
    return out


def _solve_rows_task(*args):
    return solve_rows(*args)


class ALS(Recommender):
    """Alternating least squares for explicit ratings (with biases) or implicit feedback."""

    kind = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        implicit: bool = False,
        alpha: float = 10.0,
        workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.factors, self.regularization, self.iterations = factors, regularization, iterations
        self.implicit, self.alpha, self.workers, self.seed = implicit, alpha, workers, seed
        self.user_factors = np.zeros((0, factors))
        self.item_factors = np.zeros((0, factors))
        self.user_bias = np.zeros(0)
        self.item_bias = np.zeros(0)

    def params(self) -> dict[str, Any]:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "iterations": self.iterations,
            "implicit": self.implicit,
            "alpha": self.alpha,
            "workers": self.workers,
            "seed": self.seed,
        }

    def _fit(self, train: Ratings) -> None:
        by_user = self.seen
        if self.implicit:
            by_user = by_user.copy()
            by_user.data = np.ones_like(by_user.data)  # any rating is an interaction
        by_item = by_user.T.tocsr()
        rng = np.random.default_rng(self.seed)
        self.item_factors = rng.normal(0, 0.01, (self.n_items, self.factors))
        self.item_bias = np.zeros(self.n_items)
        self.user_bias = np.zeros(self.n_users)
        offset = 0.0 if self.implicit else self.global_mean
        for _ in range(self.iterations):
            self._solve_users(by_user, offset)
            solved = self._solve(by_item, self.user_factors, self.user_bias, offset)
            self._unpack(solved, "item")
        # End on the user side, so folding a training user in reproduces their vector.
        self._solve_users(by_user, offset)

    def _solve_users(self, by_user: sp.csr_matrix, offset: float) -> None:
        self._unpack(self._solve(by_user, self.item_factors, self.item_bias, offset), "user")

    def _unpack(self, solved: np.ndarray, side: str) -> None:
        factors = solved[:, : self.factors]
        bias = np.zeros(len(solved)) if self.implicit else solved[:, self.factors]
        setattr(self, f"{side}_factors", factors)
        setattr(self, f"{side}_bias", bias)

    def _solve(
        self, matrix: sp.csr_matrix, fixed: np.ndarray, fixed_bias: np.ndarray, offset: float
    ) -> np.ndarray:
        args = (self.regularization, self.implicit, self.alpha)
        if self.workers <= 0:
            return solve_rows(matrix, fixed, fixed_bias, offset, *args)
        import ray

        if not ray.is_initialized():
            raise RuntimeError("ALS(workers > 0) solves on Ray: call ray.init first")
        task = ray.remote(num_cpus=1)(_solve_rows_task)
        fixed_ref, bias_ref = ray.put(fixed), ray.put(fixed_bias)
        bounds = np.linspace(0, matrix.shape[0], self.workers + 1).astype(int)
        refs = [
            task.remote(matrix[lo:hi], fixed_ref, bias_ref, offset, *args)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        return np.vstack(ray.get(refs))

    def fold_in(self, items: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, float]:
        """A user vector (and bias) for someone not in training, from their ratings,
        against the trained item factors; no retraining."""
        values = np.ones(len(items)) if self.implicit else np.asarray(ratings, dtype=np.float64)
        row = sp.csr_matrix(
            (values, (np.zeros(len(items), int), np.asarray(items))), shape=(1, self.n_items)
        )
        solved = solve_rows(
            row,
            self.item_factors,
            self.item_bias,
            0.0 if self.implicit else self.global_mean,
            self.regularization,
            self.implicit,
            self.alpha,
        )[0]
        return solved[: self.factors], 0.0 if self.implicit else float(solved[self.factors])

    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        vector, bias = self.fold_in(items, ratings)
        scores = self.item_factors @ vector + self.item_bias
        return scores if self.implicit else scores + self.global_mean + bias

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        scores = self.user_factors[users] @ self.item_factors.T + self.item_bias[None, :]
        if not self.implicit:
            scores += self.global_mean + self.user_bias[users, None]
        return scores

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        out = np.full(len(users), self.global_mean)
        known_user = (users >= 0) & (users < self.n_users)
        known_item = (items >= 0) & (items < self.n_items)
        if not self.implicit:
            out[known_user] += self.user_bias[users[known_user]]
            out[known_item] += self.item_bias[items[known_item]]
            both = known_user & known_item
            out[both] += np.einsum(
                "ij,ij->i", self.user_factors[users[both]], self.item_factors[items[both]]
            )
        return self.clip(out)

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        norms = np.linalg.norm(self.item_factors, axis=1)
        sims = self.item_factors @ self.item_factors[item] / np.maximum(norms * norms[item], 1e-12)
        sims[item] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        return top, sims[top]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "user_bias": self.user_bias,
            "item_bias": self.item_bias,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            setattr(self, name, value)
