"""Every rayline recommender on the evaluation protocol of ../shared/docs/cf-protocol.md:
task A (rating prediction: RMSE, MAE) and task B (top-10 ranking: P@10, R@10, nDCG@10,
MAP@10, coverage), with fit seconds, seconds for every user's top-10 and peak memory.
Each model runs in its own process so its peak memory is its own.

    .venv/bin/python benchmarks/recommender.py --data PATH/TO/ml-latest-small [--models ...]

PATH is any MovieLens-format directory (ratings.csv or u.data) or ratings file. Without
--data it uses ../shared/data/movielens/ml-latest-small beside the repository.
Last stdout line: {"data": ..., "models": {name: {"rmse", "mae", "precision@10",
"recall@10", "ndcg@10", "map@10", "coverage", "fit_s", "topk_all_users_s", "peak_rss_mb"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "movielens", "ml-latest-small")

# Hyper-parameters as chosen on the protocol's inner split (seed 43), never on test.
MODELS = {
    "popular": {"model": "popular"},
    "user_knn_pearson": {
        "model": "user_knn",
        "user_knn": {"similarity": "pearson", "k": 40, "shrinkage": 10, "power": 1},
    },
    "user_knn_cosine": {
        "model": "user_knn",
        "user_knn": {"similarity": "cosine", "k": 100, "shrinkage": 0, "power": 2},
    },
    "als": {"model": "als", "als": {"factors": 64, "regularization": 0.05, "iterations": 15}},
    "als_implicit": {
        "model": "als",
        "als": {
            "factors": 64,
            "regularization": 30,
            "iterations": 15,
            "implicit": True,
            "alpha": 10,
        },
    },
    "ease": {"model": "ease", "ease": {"regularization": 500}},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_one(name: str, data_path: str) -> dict:
    from rayline.config import from_dict
    from rayline.recsys.data import load_ratings
    from rayline.recsys.evaluate import peak_rss_mb, protocol_splits, ranking_task, rating_task
    from rayline.recsys.pipeline import RecommenderConfig, build_model

    cfg = from_dict(RecommenderConfig, {"pipeline": "recommender", **MODELS[name]})
    data = load_ratings(data_path)
    rating = rating_task(lambda: build_model(cfg), data)
    train, test = protocol_splits(data, inner=False)
    ranking = ranking_task(lambda: build_model(cfg), train, test)
    return {"rmse": rating["rmse"], "mae": rating["mae"], **ranking, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="MovieLens-format directory or ratings file"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.data)))
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    results = {}
    for name in names:
        log(f"{name} ...")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", name, "--data", args.data],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            sys.exit(f"{name} failed (exit {proc.returncode})")
        results[name] = {
            k: round(v, 4) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()
        }
        log(f"  {results[name]}")
    print(json.dumps({"data": os.path.abspath(args.data), "models": results}))


if __name__ == "__main__":
    main()
