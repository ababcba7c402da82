"""The evaluation protocol of docs/cf-protocol.md: task A (rating prediction,
RMSE/MAE on a random 80/20 row split) and task B (top-10 ranking on a per-user 75/25
split), plus the inner split that hyper-parameters are chosen on."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np

from rayline.recsys.base import Recommender
from rayline.recsys.data import Ratings, per_user_split, rating_split
from rayline.recsys.metrics import mae, ranking_metrics, rmse

K = 10


def rating_task(make_model: Callable[[], Recommender], data: Ratings) -> dict[str, float]:
    """Task A: fit on 80 % of rows, RMSE and MAE on the rest (unknown users or items get
    the model's fallback; predictions are clipped to the rating scale)."""
    train, test = rating_split(data)
    started = time.perf_counter()
    model = make_model().fit(train)
    fit_s = time.perf_counter() - started
    predicted = model.predict(test.users, test.items)
    return {
        "rmse": rmse(test.ratings, predicted),
        "mae": mae(test.ratings, predicted),
        "rating_fit_s": fit_s,
    }


def ranking_task(
    make_model: Callable[[], Recommender], train: Ratings, test: Ratings
) -> dict[str, float]:
    """Task B on a given split: rank every train item for every user, leave out the
    user's train items, compare the top 10 with the user's test items."""
    started = time.perf_counter()
    model = make_model().fit(train)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    top, relevant = ranked(model, train, test)  # its Ray workers (ALS, user kNN) rank too
    topk_s = time.perf_counter() - started
    candidates = int((np.bincount(train.items, minlength=train.n_items) > 0).sum())
    metrics = ranking_metrics(top, relevant, K, candidates)
    return {**metrics, "fit_s": fit_s, "topk_all_users_s": topk_s}


def ranked(model, train: Ratings, test: Ratings) -> tuple[list, list[set]]:
    """Every user's top K of the train items they have not rated, and their test items."""
    candidates = np.bincount(train.items, minlength=train.n_items) > 0
    relevant: list[set] = [set() for _ in range(train.n_users)]
    for user, item in zip(test.users.tolist(), test.items.tolist()):
        relevant[user].add(item)
    top, _ = model.recommend_all(K, candidates=candidates, workers=getattr(model, "workers", 0))
    return list(top), relevant


def protocol_splits(data: Ratings, inner: bool) -> tuple[Ratings, Ratings]:
    """Task B's split (seed 42), or the inner split of its train part (seed 43) on
    which hyper-parameters are chosen."""
    train, test = per_user_split(data, 0.75, seed=42)
    return per_user_split(train, 0.75, seed=43) if inner else (train, test)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
