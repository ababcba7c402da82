"""Every rayline recommender and its peers (Surprise's SVD and KNNBasic, `implicit`'s ALS)
on the evaluation protocol of docs/cf-protocol.md, in the same run, on the same
splits and metrics: task A (rating prediction: RMSE, MAE) and task B (top-10 ranking:
P@10, R@10, nDCG@10, MAP@10, coverage), with fit seconds, seconds for every user's top-10
and peak memory. Each model runs in its own process so its peak memory is its own, with
one BLAS/OpenMP thread for every system.

    .venv/bin/python benchmarks/recommender.py --data PATH/TO/ml-latest-small [--models ...]

PATH is any MovieLens-format directory (ratings.csv or u.data) or ratings file. Without
--data it uses common.MOVIELENS_SMALL: data/movielens/ml-latest-small in the repository
(grouplens.org's ml-latest-small.zip unzipped there; not shipped) or $RAYLINE_MOVIELENS.
Hyper-parameters come from benchmarks/recommender_params.json, which
benchmarks/choose_recommender_params.py writes from a seeded search on the protocol's
inner split (never the test part).

Peers: Surprise's SVD is scored for ranking from its own learned biases and factors;
KNNBasic ranks only by predicting every (user, item) pair one Python call at a time
(5M calls here), so it takes part in task A only; `implicit` learns from interactions,
so its ALS takes part in task B only. A task a model does not take part in is null.
Last stdout line: {"data": ..., "models": {name: {"rmse", "mae", "precision@10",
"recall@10", "ndcg@10", "map@10", "coverage", "fit_s", "topk_all_users_s", "peak_rss_mb"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from common import MOVIELENS_SMALL, emit, log, run_json
from rayline.recsys.base import Recommender

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = MOVIELENS_SMALL
PARAMS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recommender_params.json")

RAYLINE_MODELS = {
    "popular": "popular",
    "user_knn_pearson": "user_knn",
    "user_knn_cosine": "user_knn",
    "als": "als",
    "als_implicit": "als",
    "ease": "ease",
}
PEERS = ("surprise_svd", "surprise_knn_basic", "implicit_als")
TASKS = {  # which protocol tasks each model takes part in
    **{name: ("rating", "ranking") for name in RAYLINE_MODELS},
    "surprise_svd": ("rating", "ranking"),
    "surprise_knn_basic": ("rating",),
    "implicit_als": ("ranking",),
}


def load_params() -> dict[str, dict]:
    with open(PARAMS_FILE) as f:
        return json.load(f)["params"]


def make_model(name: str, params: dict):
    """An untrained model with `params`: rayline's through its pipeline config, a peer
    through its adapter."""
    if name in RAYLINE_MODELS:
        from rayline.config import from_dict
        from rayline.recsys.pipeline import RecommenderConfig, build_model

        kind = RAYLINE_MODELS[name]
        section = {} if kind == "popular" else {kind: params}
        config = {"pipeline": "recommender", "model": kind, **section}
        return build_model(from_dict(RecommenderConfig, config))
    return {"surprise_svd": SurpriseSVD, "surprise_knn_basic": SurpriseKNN}.get(name, ImplicitALS)(
        **params
    )


class Peer(Recommender):
    """A peer library's model behind rayline's Recommender interface, so the protocol
    ranks it with the same code (fit, score, recommend with the same masking) and it gets
    the same dense-id Ratings. What the protocol never calls is not implemented."""

    kind = "peer"

    def score(self, users):
        raise NotImplementedError(f"{type(self).__name__} does not rank")

    def predict(self, users, items):
        raise NotImplementedError(f"{type(self).__name__} does not predict ratings")

    def score_new_user(self, items, ratings):
        raise NotImplementedError

    def similar_items(self, item, k=10):
        raise NotImplementedError

    def params(self):
        raise NotImplementedError

    def arrays(self):
        raise NotImplementedError

    def load_arrays(self, arrays):
        raise NotImplementedError


def _surprise_trainset(train):
    import pandas as pd
    from surprise import Dataset, Reader

    frame = pd.DataFrame({"user": train.users, "item": train.items, "rating": train.ratings})
    reader = Reader(rating_scale=(0.5, 5.0))
    return Dataset.load_from_df(frame[["user", "item", "rating"]], reader).build_full_trainset()


class SurprisePeer(Peer):
    def _fit(self, train) -> None:
        self.algo.fit(_surprise_trainset(train))

    def predict(self, users, items):
        # -1 (unseen in training) is an unknown raw id: Surprise's own fallback answers.
        return np.array(
            [self.algo.predict(int(u), int(i)).est for u, i in zip(users, items)],
            dtype=np.float64,
        )


class SurpriseSVD(SurprisePeer):
    def __init__(self, **params):
        from surprise import SVD

        super().__init__()
        self.algo = SVD(random_state=0, **params)

    def score(self, users):
        """SVD's own estimate for every item: mean + b_u + b_i + p_u . q_i."""
        trainset = self.algo.trainset
        n_items = self.seen.shape[1]
        # An item no one rated in this split has no factors: it is not a candidate.
        inner_items = np.array([trainset._raw2inner_id_items.get(i, -1) for i in range(n_items)])
        known = inner_items >= 0
        inner_items[~known] = 0
        bi, qi = self.algo.bi[inner_items], self.algo.qi[inner_items]
        inner_users = np.array([trainset.to_inner_uid(int(u)) for u in users])
        scores = (
            trainset.global_mean
            + self.algo.bu[inner_users][:, None]
            + bi[None, :]
            + self.algo.pu[inner_users] @ qi.T
        )
        scores[:, ~known] = -np.inf
        return scores


class SurpriseKNN(SurprisePeer):
    def __init__(self, **params):
        from surprise import KNNBasic

        super().__init__()
        self.algo = KNNBasic(
            sim_options={"name": "cosine", "user_based": True}, verbose=False, **params
        )


class ImplicitALS(Peer):
    def __init__(self, **params):
        from implicit.cpu.als import AlternatingLeastSquares

        super().__init__()
        self.model = AlternatingLeastSquares(random_state=0, num_threads=1, **params)

    def _fit(self, train) -> None:
        interactions = self.seen.copy().astype(np.float32)
        interactions.data[:] = 1.0  # any rating is an interaction, as in the protocol
        self.model.fit(interactions, show_progress=False)

    def score(self, users):
        return self.model.user_factors[users] @ self.model.item_factors.T


def run_one(name: str, data_path: str) -> dict:
    from rayline.recsys.data import load_ratings
    from rayline.recsys.evaluate import peak_rss_mb, protocol_splits, ranking_task, rating_task

    params = load_params()[name]
    data = load_ratings(data_path)
    result: dict = {}
    if "rating" in TASKS[name]:
        rating = rating_task(lambda: make_model(name, params), data)
        result.update(rmse=rating["rmse"], mae=rating["mae"])
    if "ranking" in TASKS[name]:
        train, test = protocol_splits(data, inner=False)
        result.update(ranking_task(lambda: make_model(name, params), train, test))
    return {**result, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="MovieLens-format directory or ratings file"
    )
    every = [*RAYLINE_MODELS, *PEERS]
    parser.add_argument(
        "--models", default=",".join(every), help=f"comma-separated, from {', '.join(every)}"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(args.one, args.data))
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in every]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(every)}")
    if not os.path.exists(args.data):
        parser.error(
            f"--data {args.data}: no such file or folder; this benchmark needs MovieLens "
            "ml-latest-small: unzip grouplens.org's ml-latest-small.zip into "
            "data/movielens/, or set $RAYLINE_MOVIELENS"
        )
    results = {}
    for name in names:
        log(f"{name} ...")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        argv = [sys.executable, os.path.abspath(__file__), "--one", name, "--data", args.data]
        measured = run_json(argv, env=env)
        results[name] = {
            key: round(measured[key], 4) if key in measured else None
            for key in (
                "rmse",
                "mae",
                "precision@10",
                "recall@10",
                "ndcg@10",
                "map@10",
                "coverage",
                "fit_s",
                "topk_all_users_s",
                "peak_rss_mb",
            )
        }
        log(f"  {results[name]}")
    print(
        json.dumps(
            {
                "data": os.path.abspath(args.data),
                "params_chosen_by": "benchmarks/choose_recommender_params.py",
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
