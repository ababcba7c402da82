"""Rating and top-k ranking metrics, exactly as docs/cf-protocol.md defines them.

Ranking metrics take each user's recommended list (best first) and relevant set, and
average over users with at least one relevant item; scikit-learn has no metric at k over
lists of unequal length, so they are here. RMSE and MAE are scikit-learn's, (y_true,
y_pred) as everywhere.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk


def rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    return float(sk.root_mean_squared_error(actual, np.asarray(predicted, np.float64)))


def mae(actual: np.ndarray, predicted: np.ndarray) -> float:
    return float(sk.mean_absolute_error(actual, np.asarray(predicted, np.float64)))


def ndcg_per_user(recommended: list[np.ndarray], relevant: list[set], k: int) -> list[float]:
    """nDCG@k (binary gains) of each user with relevant items, in user order."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    scores = []
    for items, rel in zip(recommended, relevant):
        if not rel:
            continue
        top = list(items[:k])
        hits = np.array([item in rel for item in top], dtype=bool)
        scores.append(
            float(discounts[: len(top)][hits].sum() / discounts[: min(k, len(rel))].sum())
        )
    return scores


def ranking_metrics(
    recommended: list[np.ndarray], relevant: list[set], k: int, n_candidates: int
) -> dict[str, float]:
    """Precision@k, Recall@k, nDCG@k (binary gains), MAP@k and catalogue coverage.

    MAP@k: the sum of Precision@r over hit ranks r, over min(k, |relevant|).
    Coverage: distinct items in any list over the number of candidate items.
    """
    precision, recall, average_precision = [], [], []
    shown: set = set()
    for items, rel in zip(recommended, relevant):
        top = list(items[:k])
        shown.update(top)
        if not rel:
            continue
        hits = np.array([item in rel for item in top], dtype=bool)
        n_hits = int(hits.sum())
        precision.append(n_hits / k)
        recall.append(n_hits / len(rel))
        hit_ranks = np.nonzero(hits)[0] + 1
        average_precision.append(
            sum(np.cumsum(hits)[r - 1] / r for r in hit_ranks) / min(k, len(rel))
        )
    return {
        f"precision@{k}": float(np.mean(precision)),
        f"recall@{k}": float(np.mean(recall)),
        f"ndcg@{k}": float(np.mean(ndcg_per_user(recommended, relevant, k))),
        f"map@{k}": float(np.mean(average_precision)),
        "coverage": len(shown) / n_candidates,
    }
