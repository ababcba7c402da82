"""The same 24 sampled XGBoost configurations on breast_cancer and on digits, run three
ways on this machine: (a) a plain sequential xgboost loop, (b) rayline's Tune sweep
without early stopping, (c) the same sweep with ASHA stopping trials that trail.

    .venv/bin/python benchmarks/xgboost_sweep.py [--datasets breast_cancer digits] [--samples 24]

(a) trains each of (b)'s sampled configurations in turn with XGBoost's default threads
(all cores), evaluating on the validation set every round as the trials do. Walls are
the runs alone, with Ray already started: a cluster outlives its sweeps.
`tune_floor_s`, measured first: a Tune sweep of as many trials with the same resources
and settings whose trainable only reports once, i.e. what any Tune sweep of that size
pays before boosting a single round (starting the trial processes, Tune's driver).
Rounds count boosting rounds; (c)'s fraction is its rounds over (b)'s. The gap is
(best (c) logloss - best (b) logloss) / best (b). `registered_reproduces`: the models
registered by (b) and (c), loaded from the registry, score exactly what their trials
reported.
Last stdout line: {"datasets": {name: {"plain_wall_s", "tune_wall_s", "asha_wall_s",
"tune_vs_plain", "asha_rounds_fraction", "asha_logloss_gap", "registered_reproduces",
"tune_floor_s", "floor_vs_plain", ...}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import emit, log

SPACE = {
    "params.eta": {"loguniform": [0.03, 0.3]},
    "params.max_depth": {"randint": [2, 9]},
    "params.min_child_weight": {"loguniform": [0.5, 10]},
    "params.subsample": {"uniform": [0.5, 1.0]},
    "params.colsample_bytree": {"uniform": [0.5, 1.0]},
    "params.reg_lambda": {"loguniform": [0.1, 10]},
    "params.reg_alpha": {"loguniform": [0.001, 1]},
    "train.rounds": {"randint": [100, 301]},
}


def sweep(data_path: str, workdir: str, name: str, scheduler: str, samples: int):
    """One rayline sweep: (wall_s, every trial's result, best result, registered
    version, the prepared inputs)."""
    from rayline import config as configlib
    from rayline import pipelines

    pipeline = pipelines.get_pipeline("xgboost")
    cfg = configlib.from_dict(
        pipeline.config_cls,
        {
            "data": {"path": data_path, "label": "target"},
            "train": {"early_stopping_rounds": 0},
            "run": {
                "name": name,
                "storage_path": os.path.join(workdir, "ray_results"),
                "store_uri": os.path.join(workdir, "artifacts"),
            },
            "sweep": {
                "num_samples": samples,
                "seed": 0,
                "scheduler": scheduler,
                # Rungs at 30 and 120 rounds: earlier rungs favour a high eta that
                # leads at first and is overtaken later.
                "grace_period": 30,
                "reduction_factor": 4,
                "params": SPACE,
            },
        },
    )
    prepared = pipelines.prepare(pipeline, cfg)
    started = time.perf_counter()
    outcome = pipelines.run(pipeline, cfg, sweep=True, prepared=prepared)
    wall = time.perf_counter() - started
    return wall, list(outcome.results), outcome.best, outcome.version, prepared.inputs


def noop_trial(config: dict) -> None:
    from ray import tune

    tune.report({"valid_loss": 0.0})


def tune_floor(workdir: str, name: str, samples: int) -> float:
    """Wall of a Tune sweep of `samples` trials that do nothing but report once, run with
    rayline's trial resources and Tune settings."""
    from ray import tune

    from rayline.pipelines import tune_settings

    tune_settings()
    tuner = tune.Tuner(
        tune.with_resources(noop_trial, {"cpu": 1}),
        param_space={"seed": tune.randint(0, 2**31)},
        tune_config=tune.TuneConfig(num_samples=samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=os.path.join(workdir, "ray_results"), verbose=0
        ),
    )
    started = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - started


def plain_loop(configs: list[dict], inputs: dict) -> float:
    """Each configuration trained in turn by xgboost itself, as a script would."""
    import xgboost as xgb

    from rayline.boosting.config import XGBoostConfig
    from rayline.boosting.train import booster_params
    from rayline.config import from_dict

    task = inputs["task"]
    dtrain = inputs["train"].dmatrix(os.cpu_count())
    dvalid = inputs["valid"].dmatrix(os.cpu_count())
    started = time.perf_counter()
    for config in configs:
        cfg = from_dict(XGBoostConfig, config)
        params = booster_params(cfg.params, task, threads=os.cpu_count(), seed=cfg.run.seed)
        xgb.train(
            params,
            dtrain,
            num_boost_round=cfg.train.rounds,
            evals=[(dvalid, "valid")],
            verbose_eval=False,
        )
    return time.perf_counter() - started


def reproduces(version, store_uri: str, inputs: dict) -> bool:
    from rayline.boosting.model import BoostedModel
    from rayline.boosting.report import final_metrics
    from rayline.store import ModelRegistry

    registry = ModelRegistry(store_uri)
    model = registry.get(version.name, version.version)
    files = registry.read_files(model)
    scored = final_metrics(BoostedModel.from_files(files), inputs["valid"])
    return scored["valid_loss"] == model.metrics["valid_loss"]


def run_dataset(name: str, samples: int, workdir: str) -> dict:
    from rayline.boosting.data import export_sklearn

    data_path = export_sklearn(name, os.path.join(workdir, "data"))
    log(f"[{name}] Tune's floor: {samples} trials that only report")
    floor_wall = tune_floor(workdir, f"{name}-floor", samples)
    log(f"[{name}] (b) Tune sweep, no early stopping")
    tune_wall, tune_results, tune_best, tune_version, inputs = sweep(
        data_path, workdir, f"{name}-tune", "fifo", samples
    )
    configs = [r.config for r in tune_results]
    log(f"[{name}] (a) plain loop over the same {len(configs)} configurations")
    plain_wall = plain_loop(configs, inputs)
    log(f"[{name}] (c) Tune sweep with ASHA")
    asha_wall, asha_results, asha_best, asha_version, _ = sweep(
        data_path, workdir, f"{name}-asha", "asha", samples
    )
    tune_rounds = sum(int(r.metrics["rounds"]) for r in tune_results)
    asha_rounds = sum(int(r.metrics["rounds"]) for r in asha_results)
    best_tune = min(r.metrics["valid_loss"] for r in tune_results)
    best_asha = asha_best.metrics["valid_loss"]
    store = os.path.join(workdir, "artifacts")
    return {
        "rows": len(inputs["train"]) + len(inputs["valid"]),
        "trials": len(configs),
        "plain_wall_s": round(plain_wall, 2),
        "tune_wall_s": round(tune_wall, 2),
        "asha_wall_s": round(asha_wall, 2),
        "tune_vs_plain": round(tune_wall / plain_wall, 3),
        "asha_vs_plain": round(asha_wall / plain_wall, 3),
        "tune_floor_s": round(floor_wall, 2),
        "floor_vs_plain": round(floor_wall / plain_wall, 3),
        "tune_rounds": tune_rounds,
        "asha_rounds": asha_rounds,
        "asha_rounds_fraction": round(asha_rounds / tune_rounds, 3),
        "tune_best_logloss": round(best_tune, 5),
        "asha_best_logloss": round(best_asha, 5),
        "asha_logloss_gap": round((best_asha - best_tune) / best_tune, 4),
        "registered_reproduces": reproduces(tune_version, store, inputs)
        and reproduces(asha_version, store, inputs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits"])
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()

    from rayline.testing import init_local_ray

    init_local_ray(num_cpus=os.cpu_count())
    report = {"cpus": os.cpu_count(), "datasets": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.datasets:
            report["datasets"][name] = run_dataset(name, args.samples, workdir)
            log(f"[{name}] {json.dumps(report['datasets'][name])}")
    emit(report)


if __name__ == "__main__":
    main()
