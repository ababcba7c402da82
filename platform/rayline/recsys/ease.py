"""EASE: item-based collaborative filtering as a closed-form linear model.

Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"
(https://arxiv.org/abs/1905.03375). Learn an item-item weight matrix B with a zero
diagonal that reconstructs each user's interactions from their other interactions:
min ||X - XB||^2 + lambda ||B||^2, solved by P = (X'X + lambda I)^-1, B = -P / diag(P).
A user's scores are X_u B: items that co-occur with what they interacted with.

It costs one dense n_items x n_items inverse: fine up to tens of thousands of items;
past that, the neighbourhood and ALS models scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from rayline.recsys.base import Recommender
from rayline.recsys.data import Ratings


class EASE(Recommender):
    """Closed-form item-item model on binary interactions, for ranking."""

    kind = "ease"

    def __init__(self, regularization: float = 300.0):
        super().__init__()
        self.regularization = regularization
        self.weights = np.zeros((0, 0), dtype=np.float32)
        """B: item-item weights, zero diagonal."""

    def params(self) -> dict[str, Any]:
        return {"regularization": self.regularization}

    def _fit(self, train: Ratings) -> None:
        interactions = (self.seen > 0).astype(np.float64)
        gram = (interactions.T @ interactions).toarray()
        gram[np.diag_indices_from(gram)] += self.regularization
        # In place where possible: two dense n_items^2 float64 matrices at the peak, not four.
        inverse = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
        del gram
        inverse /= -np.diag(inverse)
        inverse[np.diag_indices_from(inverse)] = 0.0
        self.weights = inverse.astype(np.float32)

    def score(self, users: np.ndarray) -> np.ndarray:
        interactions = (self.seen[np.asarray(users)] > 0).astype(np.float32)
        return np.asarray(interactions @ self.weights)

    def score_new_user(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        return self.weights[np.asarray(items)].sum(axis=0)  # x B for a binary row x

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """A ranking model: rating predictions are the global mean (its fallback)."""
        return self.clip(np.full(len(np.asarray(users)), self.global_mean))

    def similar_items(self, item: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items with the largest weight towards `item` in the learned model."""
        column = self.weights[:, item].astype(np.float64)
        column[item] = -np.inf
        top = np.argsort(-column, kind="stable")[:k]
        return top, column[top]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = arrays["weights"]
