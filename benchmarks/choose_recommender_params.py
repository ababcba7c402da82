"""Choose the hyper-parameters that benchmarks/recommender.py uses, for rayline's models
and the peers alike: a seeded random search of each model's space on the protocol's
inner split (docs/cf-protocol.md; the test part is never seen), writing
benchmarks/recommender_params.json.

Models that predict ratings and rank are chosen by the task they are best known for:
the rating models (pearson user-kNN, explicit ALS, Surprise's SVD and KNNBasic) by RMSE
on the inner rating split, the ranking models by nDCG@10 on the inner ranking split.

    .venv/bin/python benchmarks/choose_recommender_params.py [--data DIR] [--samples 6]

Last stdout line: {"data", "samples", "seed", "params": {name: {...}},
"scores": {name: {"select_by", "value", "tried"}}}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import numpy as np

from common import emit, log
from recommender import DEFAULT_DATA, PARAMS_FILE, TASKS, make_model

SPACES = {
    "popular": {"damping": [0.0, 2.0, 5.0, 20.0]},
    "user_knn_pearson": {
        "similarity": ["pearson"],
        "k": [20, 40, 60, 100],
        "shrinkage": [0.0, 10.0, 50.0],
        "power": [1.0],
    },
    "user_knn_cosine": {
        "similarity": ["cosine"],
        "k": [20, 50, 100, 200],
        "shrinkage": [0.0, 10.0],
        "power": [1.0, 2.0, 3.0],
    },
    "als": {
        "factors": [16, 32, 64],
        "regularization": [0.02, 0.05, 0.1, 0.2],
        "iterations": [15],
    },
    "als_implicit": {
        "factors": [32, 64, 128],
        "regularization": [1.0, 10.0, 30.0, 100.0],
        "iterations": [15],
        "implicit": [True],
        "alpha": [1.0, 5.0, 10.0, 40.0],
    },
    "ease": {"regularization": [50.0, 200.0, 500.0, 1000.0, 2000.0]},
    "surprise_svd": {
        "n_factors": [20, 50, 100],
        "lr_all": [0.002, 0.005, 0.01],
        "reg_all": [0.02, 0.05, 0.1],
        "n_epochs": [20],
    },
    "surprise_knn_basic": {"k": [20, 40, 60, 100]},
    "implicit_als": {
        "factors": [32, 64, 128],
        "regularization": [0.01, 0.05, 0.1, 1.0],
        "alpha": [1.0, 5.0, 10.0, 40.0],
        "iterations": [15],
    },
}
RATING_SELECTED = {"user_knn_pearson", "als", "surprise_svd", "surprise_knn_basic"}


def candidates(space: dict, samples: int, rng: np.random.Generator) -> list[dict]:
    """Up to `samples` distinct draws from the grid, in a seeded order."""
    keys = sorted(space)
    sizes = [len(space[k]) for k in keys]
    total = int(np.prod(sizes))
    picks = rng.permutation(total)[:samples]
    drawn = []
    for flat in picks.tolist():
        choice = {}
        for key, size in zip(keys, sizes):
            flat, index = divmod(flat, size)
            value = space[key][index]
            choice[key] = value.item() if hasattr(value, "item") else value
        drawn.append(choice)
    return drawn


def main() -> None:
    from rayline.recsys.data import load_ratings, rating_split
    from rayline.recsys.evaluate import protocol_splits, ranking_task, rating_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--samples", type=int, default=6, help="configurations per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(SPACES))
    args = parser.parse_args()
    data = load_ratings(args.data)
    inner_rating, _ = rating_split(data)  # task A's test rows are never seen
    inner_train, inner_valid = protocol_splits(data, inner=True)
    rng = np.random.default_rng(args.seed)
    chosen, scores = {}, {}
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        by_rmse = name in RATING_SELECTED or "ranking" not in TASKS[name]
        best, best_value, tried = None, None, []
        for params in candidates(SPACES[name], args.samples, rng):
            factory = functools.partial(make_model, name, params)
            if by_rmse:
                value = rating_task(factory, inner_rating)["rmse"]
                better = best_value is None or value < best_value
            else:
                value = ranking_task(factory, inner_train, inner_valid)["ndcg@10"]
                better = best_value is None or value > best_value
            tried.append({"params": params, "value": round(value, 4)})
            log(f"{name} {params}: {'rmse' if by_rmse else 'ndcg@10'}={value:.4f}")
            if better:
                best, best_value = params, value
        chosen[name] = best
        scores[name] = {
            "select_by": "rmse" if by_rmse else "ndcg@10",
            "value": round(best_value, 4),
            "tried": tried,
        }
    previous = {}
    if os.path.exists(PARAMS_FILE):
        with open(PARAMS_FILE) as f:
            previous = json.load(f)["params"]
    body = {
        "data": os.path.basename(os.path.abspath(args.data)),
        "samples": args.samples,
        "seed": args.seed,
        "params": {**previous, **chosen},
        "scores": scores,
    }
    tmp = f"{PARAMS_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, PARAMS_FILE)
    emit({k: body[k] for k in ("data", "samples", "seed", "params", "scores")})


if __name__ == "__main__":
    main()
