"""XGBoost's evaluation metrics recomputed in float64 numpy from predictions, so that a
registered model's score can be checked to reproduce what its trial reported."""

from __future__ import annotations

import numpy as np

# XGBoost clips probabilities the same way before taking logs.
EPS = 1e-16


def logloss(label: np.ndarray, prob: np.ndarray) -> float:
    p = np.clip(prob.astype(np.float64), EPS, 1 - EPS)
    return float(-np.mean(label * np.log(p) + (1 - label) * np.log(1 - p)))


def error(label: np.ndarray, prob: np.ndarray) -> float:
    return float(np.mean((prob > 0.5) != (label == 1)))


def auc(label: np.ndarray, prob: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties share their mean rank)."""
    positives = label == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(prob, kind="mergesort")
    ranks = np.empty(len(prob))
    sorted_prob = prob[order]
    # Average ranks over runs of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_prob)) + 1]
    ends = np.r_[starts[1:], len(prob)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mlogloss(label: np.ndarray, prob: np.ndarray) -> float:
    p = np.clip(prob[np.arange(len(label)), label.astype(np.int64)].astype(np.float64), EPS, 1)
    return float(-np.mean(np.log(p)))


def merror(label: np.ndarray, prob: np.ndarray) -> float:
    return float(np.mean(prob.argmax(axis=1) != label))


def rmse(label: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred.astype(np.float64) - label) ** 2)))


def mae(label: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(pred.astype(np.float64) - label)))


METRICS = {
    "logloss": logloss,
    "error": error,
    "auc": auc,
    "mlogloss": mlogloss,
    "merror": merror,
    "rmse": rmse,
    "mae": mae,
}

HIGHER_IS_BETTER = frozenset({"auc"})
