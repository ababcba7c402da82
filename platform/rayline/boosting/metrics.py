"""XGBoost's evaluation metrics computed from a saved model's predictions with
scikit-learn, in float64, so that a registered model's score can be checked to reproduce
what its trial reported. Every function takes (y_true, y_pred)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk


def logloss(label: np.ndarray, prob: np.ndarray) -> float:
    return float(sk.log_loss(label, prob.astype(np.float64), labels=[0, 1]))


def error(label: np.ndarray, prob: np.ndarray) -> float:
    return float(1.0 - sk.accuracy_score(label == 1, prob > 0.5))


def auc(label: np.ndarray, prob: np.ndarray) -> float:
    if len(np.unique(label)) < 2:  # undefined with one class
        return float("nan")
    return float(sk.roc_auc_score(label, prob.astype(np.float64)))


def mlogloss(label: np.ndarray, prob: np.ndarray) -> float:
    # XGBoost's float32 probabilities sum to 1 only to float32's precision.
    prob = prob.astype(np.float64)
    prob /= prob.sum(axis=1, keepdims=True)
    classes = np.arange(prob.shape[1])
    return float(sk.log_loss(label.astype(np.int64), prob, labels=classes))


def merror(label: np.ndarray, prob: np.ndarray) -> float:
    return float(1.0 - sk.accuracy_score(label, prob.argmax(axis=1)))


def rmse(label: np.ndarray, pred: np.ndarray) -> float:
    return float(sk.root_mean_squared_error(label, pred.astype(np.float64)))


def mae(label: np.ndarray, pred: np.ndarray) -> float:
    return float(sk.mean_absolute_error(label, pred.astype(np.float64)))


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
