"""The recommender at MovieLens-20M size, on the same cores as its peer (issue #16).

    .venv/bin/python benchmarks/recommender_scale.py [--users 138493 --items 26744
        --ratings 20000263] [--iterations 3] [--knn-users 1200] [--data-dir DIR]

A synthetic rating set shaped like MovieLens 20M (`rayline data make-ratings`: power-law
item popularity, log-normal user activity; cached in --data-dir, default a folder under
the system's temp dir, and made again only when its size differs), then:
- rayline ALS, 64 factors, implicit and explicit: seconds per iteration (median of
  --iterations; the fit's last exact user half-step is not an iteration) with 1 and 2
  Ray workers, and the `implicit` library's ALS (CPU, 64 factors, conjugate gradient,
  float32) with 1 and 2 threads on the same binarised matrix;
- user kNN (Pearson, shrinkage 10, a pool of 400): its cost grows with the sum over items
  of (raters of the item)^2, about 2.4e11 here, so the neighbours of --knn-users users
  (against all users) are searched with 1 and 2 workers, and the whole fit's time is
  projected from that (`projected_all_users`; labelled, not measured);
- every user's top-10 over all items (blocks of users, on 1 and 2 Ray workers);
- the Serve route GET /recommend/{user}?k=10 answered by the implicit ALS model fitted
  above, registered and served as `rayline serve` serves it (the front, direct ingress,
  batching): p50/p99 at concurrency 1 and 8 over real HTTP, users drawn at random; and
  the same RecommenderService behind a plain FastAPI + uvicorn app, one server up at a
  time, for the HTTP stack's floor on these cores;
- peak memory: the summed proportional set size (PSS) of this process and every process
  it started (Ray's included), sampled twice a second, per phase and overall;
- on MovieLens ml-latest-small (data/movielens/ml-latest-small), rayline ALS on the protocol of
  docs/cf-protocol.md with benchmarks/recommender_params.json's parameters:
  nDCG@10 (implicit) and RMSE (explicit), against the figures before #16's batched solves.

Last stdout line: {"synthetic": {"ratings", "users", "items", "load_s",
 "als_implicit_s_per_iter": {"1", "2", "implicit_lib", "implicit_lib_2_threads"},
 "als_explicit_s_per_iter": {"1", "2"}, "knn_fit_s": {"1", "2", "users",
 "projected_all_users": {"1", "2"}}, "topk_all_users_s": {"1", "2"}, "peak_rss_mb",
 "peak_mb_by_phase": {...}, "serve": {"p50_ms", "p99_ms", "c1": {...}, "c8": {...},
 "plain_fastapi": {"c1", "c8"}}},
 "ml_latest_small": {"als_ndcg@10", "als_rmse", "before": {...}},
 "ratios": {"als_implicit_vs_implicit_lib": {"1", "2"}, "two_workers_speedup": {...}}}
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from common import MOVIELENS_SMALL as ML_SMALL
from common import drive, emit, log, plain_fastapi, wait_front_ready, wait_ready

HERE = os.path.dirname(os.path.abspath(__file__))
SERVE_PORT, PLAIN_PORT = 18601, 18801
BEFORE = {"als_ndcg@10": 0.358, "als_rmse": 0.8577}
"""benchmarks/recommender.py's figures for rayline ALS before #16 (per-row solves)."""


PHASES = ("als", "knn", "topk", "serve", "small")


class MemorySampler:
    """Peak summed PSS of this process and its descendants, per named phase."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.phase, self.peaks = every_s, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _descendants(root: int) -> list[int]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        found, frontier = [root], [root]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            found += frontier
        return found

    @staticmethod
    def _pss_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            total_mb = sum(map(self._pss_kb, self._descendants(os.getpid()))) / 1024
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), total_mb)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_data(directory: str, users: int, items: int, ratings: int) -> str:
    from rayline.recsys.data import make_ratings

    stamp = os.path.join(directory, "size.json")
    size = {"users": users, "items": items, "ratings": ratings, "seed": 0}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == size:
                return directory
    log(f"making {ratings:,} ratings for {users:,} users x {items:,} items in {directory} ...")
    make_ratings(directory, users, items, ratings, seed=0)
    with open(stamp, "w") as f:
        json.dump(size, f)
    return directory


def als_seconds(data, implicit: bool, workers: int, iterations: int):
    from rayline.recsys.als import ALS

    model = ALS(
        factors=64, regularization=0.1, iterations=iterations, implicit=implicit, workers=workers
    )
    started = time.perf_counter()
    model.fit(data)
    log(
        f"  rayline ALS implicit={implicit} workers={workers}: iterations "
        f"{[round(s, 2) for s in model.iteration_seconds]} s, fit {time.perf_counter() - started:.1f} s"
    )
    return statistics.median(model.iteration_seconds), model


def two_part_prediction(data) -> dict:
    """One implicit conjugate-gradient half-step over the users in this process: on all
    rows, then on each of the two parts a 2-worker fit gives its workers (ALS._parts's
    split). With a core
    per worker and nothing else running, 2 workers would be all_s / max(part_s) faster."""
    from rayline.recsys import als

    matrix = data.matrix().astype(np.float64)
    matrix.data[:] = 1.0
    fixed = np.random.default_rng(0).normal(0, 0.1, (data.n_items, 64))
    start, bias = np.zeros((data.n_users, 64)), np.zeros(data.n_items)

    def half_step(rows_matrix, rows_start) -> float:
        started = time.perf_counter()
        als.cg_rows(rows_matrix, fixed, bias, rows_start, 0.0, 0.1, True, 10.0, 3)
        return time.perf_counter() - started

    all_s = half_step(matrix, start)
    parts = als.split_batches(np.diff(matrix.indptr), als.CG_BLOCK_FLOATS // 64, 2, 32)
    part_s = [half_step(matrix[rows], start[rows]) for rows in parts]
    log(f"  one user half-step: all rows {all_s:.2f} s, the two parts {part_s} s")
    return {
        "all_s": round(all_s, 3),
        "part_s": [round(s, 3) for s in part_s],
        "predicted_speedup": round(all_s / max(part_s), 3),
    }


def implicit_lib_seconds(data, threads: int, iterations: int) -> float:
    from implicit.cpu.als import AlternatingLeastSquares

    matrix = data.matrix().astype(np.float32)
    matrix.data[:] = 1.0  # what rayline's implicit ALS fits: any rating is an interaction
    times, last = [], [0.0]

    def after_iteration(iteration, elapsed, loss) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    model = AlternatingLeastSquares(
        factors=64, regularization=0.1, iterations=iterations, num_threads=threads, random_state=0
    )
    last[0] = time.perf_counter()
    model.fit(matrix, show_progress=False, callback=after_iteration)
    log(f"  implicit ALS threads={threads}: iterations {[round(s, 2) for s in times]} s")
    return statistics.median(times)


def knn_seconds(data, sample_users: int, workers: int) -> float:
    """Neighbours of the first `sample_users` users against all users, in `workers` Ray
    tasks (UserKNN's own search, on a range of users)."""
    from rayline.recsys.base import ray_map
    from rayline.recsys.knn import UserKNN, neighbor_block

    model = UserKNN(similarity="pearson", shrinkage=10.0, pool=400)
    _, shared = model.search_inputs(data.matrix())
    bounds = np.linspace(0, sample_users, workers + 1).astype(int)
    calls = [{"start": int(lo), "stop": int(hi)} for lo, hi in zip(bounds[:-1], bounds[1:])]

    started = time.perf_counter()
    ray_map(neighbor_block, calls, **shared)
    seconds = time.perf_counter() - started
    log(f"  user kNN, {sample_users} users' neighbours, workers={workers}: {seconds:.1f} s")
    return seconds


def latencies(url: str, users: list) -> dict:
    asyncio.run(drive(url, "GET", None, 8, 2.0, 400, users=users))  # warm up
    result = {}
    for concurrency in (1, 8):
        point = asyncio.run(drive(url, "GET", None, concurrency, 10.0, 3000, users=users))
        log(f"  {url.split('/recommend')[0]}, concurrency {concurrency}: {point}")
        result[f"c{concurrency}"] = point
    return result


def serve_latency(model, store: str) -> dict:
    """Register `model`; time one user's top-10 from it served as `rayline serve` serves
    it (the front, direct ingress, batching), then from a plain FastAPI + uvicorn app
    around the same RecommenderService (the HTTP stack's floor on these cores)."""
    import subprocess

    from ray import serve

    from rayline.serving.app import build_app
    from rayline.store import ModelRegistry

    registry = ModelRegistry(store)
    registry.register("shop", model.save(), kind="recommender")
    registry.promote("shop", 1)
    users = np.random.default_rng(0).choice(model.user_ids, 500, replace=False).tolist()
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT + 100})
    serve.run(
        build_app({"store_uri": store, "front_port": SERVE_PORT}), name="rayline", route_prefix="/"
    )
    wait_front_ready(f"http://127.0.0.1:{SERVE_PORT}", replicas=1, timeout_s=600)
    rayline = latencies(f"http://127.0.0.1:{SERVE_PORT}/recommend/{{user}}?k=10&model=shop", users)
    serve.delete("rayline")
    plain = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--plain-server", store, str(PLAIN_PORT)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_ready(f"http://127.0.0.1:{PLAIN_PORT}/docs", timeout_s=600)
        peer = latencies(f"http://127.0.0.1:{PLAIN_PORT}/recommend/{{user}}?k=10", users)
    finally:
        plain.terminate()
        plain.wait(timeout=60)
    return {
        "p50_ms": rayline["c8"]["p50_ms"],
        "p99_ms": rayline["c8"]["p99_ms"],
        **rayline,
        "plain_fastapi": peer,
    }


def ml_latest_small() -> dict:
    if not os.path.isdir(ML_SMALL):
        log(f"no {ML_SMALL}: ml_latest_small skipped")
        return {}
    from recommender import run_one

    log("ml-latest-small, the protocol's splits ...")
    ndcg = run_one("als_implicit", ML_SMALL)["ndcg@10"]
    rmse = run_one("als", ML_SMALL)["rmse"]
    return {"als_ndcg@10": round(ndcg, 4), "als_rmse": round(rmse, 4), "before": BEFORE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=138_493)
    parser.add_argument("--items", type=int, default=26_744)
    parser.add_argument("--ratings", type=int, default=20_000_263)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--knn-users", type=int, default=1200)
    parser.add_argument(
        "--data-dir", default=os.path.join(tempfile.gettempdir(), "rayline-recsys-scale")
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=PHASES,
        help=f"a comma-separated subset of {','.join(PHASES)}",
    )
    parser.add_argument(
        "--plain-server", nargs=2, metavar=("STORE", "PORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.plain_server:
        plain_fastapi(args.plain_server[0], int(args.plain_server[1]), recommender="shop")
        return
    if set(args.only) - set(PHASES):
        parser.error(f"--only: unknown phase {sorted(set(args.only) - set(PHASES))[0]!r}")

    from rayline.serving.settings import direct_ingress_env

    env_vars = {**direct_ingress_env(SERVE_PORT), "OMP_NUM_THREADS": "1"}
    os.environ.update(env_vars)  # before Ray and Serve are imported, as `rayline serve` does
    import threadpoolctl

    from rayline.recsys.data import load_ratings
    from rayline.testing import init_local_ray

    threadpoolctl.threadpool_limits(1)  # one core per worker; the driver takes no part
    memory = MemorySampler()
    synthetic_data(args.data_dir, args.users, args.items, args.ratings)
    memory.phase = "load"
    started = time.perf_counter()
    data = load_ratings(args.data_dir)
    load_s = time.perf_counter() - started
    log(f"loaded {len(data):,} ratings, {data.n_users:,} x {data.n_items:,} in {load_s:.1f} s")
    init_local_ray(runtime_env={"env_vars": env_vars})
    result: dict = {
        "ratings": len(data),
        "users": data.n_users,
        "items": data.n_items,
        "load_s": round(load_s, 2),
    }
    implicit_s, explicit_s, knn, topk, served = {}, {}, {}, {}, None
    if "als" in args.only:
        for workers in (1, 2):
            memory.phase = f"als_{workers}_workers"
            implicit_s[str(workers)], served = als_seconds(data, True, workers, args.iterations)
            explicit_s[str(workers)], _ = als_seconds(data, False, workers, args.iterations)
        memory.phase = "implicit_lib"
        implicit_s["implicit_lib"] = implicit_lib_seconds(data, 1, args.iterations)
        implicit_s["implicit_lib_2_threads"] = implicit_lib_seconds(data, 2, args.iterations)
        result["als_implicit_s_per_iter"] = {k: round(v, 3) for k, v in implicit_s.items()}
        result["als_explicit_s_per_iter"] = {k: round(v, 3) for k, v in explicit_s.items()}
        memory.phase = "als_parts"
        result["als_two_parts"] = two_part_prediction(data)
    elif {"topk", "serve"} & set(args.only):
        _, served = als_seconds(data, True, 2, args.iterations)

    if "knn" in args.only:
        memory.phase = "knn"
        knn = {str(w): knn_seconds(data, args.knn_users, w) for w in (1, 2)}
        result["knn_fit_s"] = {
            **{k: round(v, 2) for k, v in knn.items()},
            "users": args.knn_users,
            "projected_all_users": {
                k: round(v * data.n_users / args.knn_users, 1) for k, v in knn.items()
            },
        }
    if "topk" in args.only:
        memory.phase = "topk"
        for workers in (1, 2):
            started = time.perf_counter()
            served.recommend_all(10, workers=workers)
            topk[str(workers)] = round(time.perf_counter() - started, 2)
            log(
                f"  top-10 for all {data.n_users:,} users, workers={workers}: {topk[str(workers)]} s"
            )
        result["topk_all_users_s"] = topk
    if "serve" in args.only:
        memory.phase = "serve"
        with tempfile.TemporaryDirectory(prefix="recsys-scale-store-") as store:
            result["serve"] = serve_latency(served, store)
    del data, served
    small = {}
    if "small" in args.only:
        memory.phase = "ml_latest_small"
        small = ml_latest_small()
    memory.stop()
    result["peak_rss_mb"] = round(max(memory.peaks.values()), 1)
    result["peak_mb_by_phase"] = {k: round(v, 1) for k, v in memory.peaks.items()}
    ratios: dict = {"two_workers_speedup": {}}
    if implicit_s:
        ratios["als_implicit_vs_implicit_lib"] = {
            "1": round(implicit_s["1"] / implicit_s["implicit_lib"], 3),
            "2": round(implicit_s["2"] / implicit_s["implicit_lib_2_threads"], 3),
        }
        ratios["two_workers_speedup"]["als_implicit"] = round(implicit_s["1"] / implicit_s["2"], 3)
        ratios["two_workers_speedup"]["als_explicit"] = round(explicit_s["1"] / explicit_s["2"], 3)
    if knn:
        ratios["two_workers_speedup"]["knn"] = round(knn["1"] / knn["2"], 3)
    if topk:
        ratios["two_workers_speedup"]["topk"] = round(topk["1"] / topk["2"], 3)
    emit({"synthetic": result, "ml_latest_small": small, "ratios": ratios})


if __name__ == "__main__":
    main()
