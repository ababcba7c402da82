"""Every pipeline, run the same way: a typed config, a Tune function trainable, and a
step that registers the best trial's model. `rayline train` is a one-trial Tune run,
`rayline sweep` the same trainable over the config's search space.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rayline import config as configlib
from rayline.config import ConfigError, SweepConfig
from rayline.store import ModelRegistry, ModelVersion, fingerprint


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How to run one kind of pipeline."""

    name: str
    config_cls: type
    trainable: Callable[[dict], None]
    resources: Callable[[Any], Any]
    """cfg -> Tune resources (dict or PlacementGroupFactory) for one trial."""
    metric: str
    mode: str
    register: Callable[[Any, Any, ModelRegistry, dict], ModelVersion]
    """(cfg, best Tune Result, registry, prepared inputs) -> the registered version."""
    prepare: Callable[[Any], dict] = lambda cfg: {}
    """cfg -> inputs loaded once in the driver and handed to every trial through the
    object store (`tune.with_parameters`); bad data fails here, before any trial."""


# Tune's bookkeeping in every result; not metrics of the model.
TUNE_KEYS = frozenset(
    {
        "timestamp",
        "checkpoint_dir_name",
        "should_checkpoint",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "time_this_iter_s",
        "time_total_s",
        "pid",
        "hostname",
        "node_ip",
        "time_since_restore",
        "iterations_since_restore",
        "experiment_tag",
    }
)


def model_metrics(result) -> dict:
    """A Tune result's own metrics, as stored in the registry."""
    return {
        k: v
        for k, v in result.metrics.items()
        if k not in TUNE_KEYS and isinstance(v, (int, float, bool, str))
    }


NOT_BUILT = {
    "xgboost": "XGBoost boosting (issue #6)",
    "transfer": "transfer learning",
    "fcn": "FCN segmentation",
}


def _dqn() -> Pipeline:
    from rayline.rl import apex
    from rayline.rl.config import DQNConfig

    def register(cfg: DQNConfig, result, registry: ModelRegistry, inputs: dict) -> ModelVersion:
        if result.checkpoint is None:
            raise RuntimeError("the best trial left no checkpoint")
        with result.checkpoint.as_directory() as directory:
            policy, state = apex.read_policy(directory)
        return registry.register(
            cfg.run.name,
            {"policy.pt": policy, "network.json": json.dumps(state["network"]).encode()},
            kind="dqn",
            metrics=model_metrics(result),
            config=state["config"],
            data_fingerprint=fingerprint(
                cfg.env.id, str(cfg.env.atari), str(cfg.env.max_episode_steps)
            ),
            run={
                "trial_id": result.metrics.get("trial_id"),
                "path": result.path,
                "checkpoint": result.checkpoint.path,
            },
        )

    return Pipeline(
        "dqn",
        DQNConfig,
        apex.dqn_trainable,
        apex.trial_resources,
        "eval_return_mean",
        "max",
        register,
    )


def _recommender() -> Pipeline:
    from rayline.recsys import pipeline as rec

    def register(
        cfg: rec.RecommenderConfig, result, registry: ModelRegistry, inputs: dict
    ) -> ModelVersion:
        data = inputs["data"]
        metrics = {k: v for k, v in result.metrics.items() if k.startswith("valid_")}
        metrics.update(rec.test_metrics(cfg, data))
        model = rec.build_model(cfg).fit(data)  # the chosen configuration, on all the data
        return registry.register(
            cfg.run.name,
            model.save(),
            kind="recommender",
            metrics=metrics,
            config=configlib.to_dict(cfg),
            data_fingerprint=rec.data_fingerprint(data),
            run={"trial_id": result.metrics.get("trial_id"), "path": result.path},
        )

    def resources(cfg: rec.RecommenderConfig):
        from ray import tune

        workers = cfg.als.workers if cfg.model == "als" else 0
        return tune.PlacementGroupFactory([{"CPU": 1}] + [{"CPU": 1}] * workers)

    return Pipeline(
        "recommender",
        rec.RecommenderConfig,
        rec.recommender_trainable,
        resources,
        "valid_ndcg@10",
        "max",
        register,
        prepare=lambda cfg: {"data": rec.load_data(cfg)},
    )


PIPELINES: dict[str, Callable[[], Pipeline]] = {"dqn": _dqn, "recommender": _recommender}


def get_pipeline(name: Any) -> Pipeline:
    if name in NOT_BUILT:
        raise ConfigError(f"pipeline: the {name!r} pipeline ({NOT_BUILT[name]}) is not built yet")
    if name not in PIPELINES:
        known = ", ".join(sorted(PIPELINES))
        raise ConfigError(f"pipeline: expected one of {known}, got {name!r}")
    return PIPELINES[name]()


def load_pipeline(path: str | Path, overrides: dict[str, Any]) -> tuple[Pipeline, Any]:
    """Read a pipeline file, pick its pipeline by the `pipeline:` key, build its config."""
    data = configlib.apply_overrides(configlib.read_yaml(path), overrides)
    if "pipeline" not in data:
        raise ConfigError(
            f"{path}: missing key 'pipeline' (expected one of {', '.join(sorted(PIPELINES))})"
        )
    pipeline = get_pipeline(data["pipeline"])
    return pipeline, configlib.from_dict(pipeline.config_cls, data)


def search_space(config: dict, sweep: SweepConfig) -> dict:
    """`config` as a Tune param_space, with each swept dotted key replaced by its domain."""
    from ray import tune

    space = configlib.apply_overrides(config, {})
    for dotted, spec in sweep.params.items():
        node = space
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"sweep.params.{dotted}: no such config key")
            node = node[part]
        if parts[-1] not in node or parts[0] == "sweep":
            raise ConfigError(f"sweep.params.{dotted}: no such config key")
        if len(spec) != 1 or next(iter(spec)) not in configlib.SEARCH_KINDS:
            raise ConfigError(
                f"sweep.params.{dotted}: expected one of {', '.join(configlib.SEARCH_KINDS)}"
            )
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not args:
                raise ConfigError(f"sweep.params.{dotted}.{kind}: expected a non-empty list")
            node[parts[-1]] = tune.choice(args) if kind == "choice" else tune.grid_search(args)
        else:
            if len(args) != 2 or not args[0] < args[1]:
                raise ConfigError(
                    f"sweep.params.{dotted}.{kind}: expected [low, high] with low < high"
                )
            node[parts[-1]] = {
                "uniform": tune.uniform,
                "loguniform": tune.loguniform,
                "randint": tune.randint,
            }[kind](*args)
    return space


@dataclasses.dataclass
class Prepared:
    """What a run needs besides its config, checked before Ray starts."""

    registry: ModelRegistry | None
    inputs: dict


def prepare(pipeline: Pipeline, cfg: Any) -> Prepared:
    """Open the model store and load the pipeline's inputs: bad paths and bad data fail
    here, in the driver, with a clear error, before any cluster work."""
    registry = ModelRegistry(cfg.run.store_uri) if cfg.run.register else None
    return Prepared(registry, pipeline.prepare(cfg))


def run(
    pipeline: Pipeline,
    cfg: Any,
    *,
    sweep: bool,
    resume: bool = False,
    prepared: Prepared | None = None,
) -> tuple[Any, ModelVersion | None]:
    """Run the pipeline under Tune (one trial, or the sweep); register the best model.
    Ray must already be initialised."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    prepared = prepared or prepare(pipeline, cfg)
    registry, inputs = prepared.registry, prepared.inputs
    config = configlib.to_dict(cfg)
    storage = _absolute(cfg.run.storage_path)
    experiment = (
        os.path.join(storage, cfg.run.name) if "://" not in storage else f"{storage}/{cfg.run.name}"
    )
    trainable = tune.with_parameters(pipeline.trainable, **inputs) if inputs else pipeline.trainable
    trainable = tune.with_resources(trainable, pipeline.resources(cfg))
    metric, mode = pipeline_metric(pipeline, cfg)
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise ConfigError(f"run.name: nothing to resume at {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        scheduler = ASHAScheduler() if sweep and cfg.sweep.scheduler == "asha" else None
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config, cfg.sweep) if sweep else config,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=cfg.sweep.num_samples if sweep else 1,
                scheduler=scheduler,
                max_concurrent_trials=cfg.sweep.max_concurrent_trials or None,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=cfg.run.name,
                storage_path=storage,
                verbose=1 if sweep else 0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                # A trial whose learner or replay died resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=2),
            ),
        )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors and len(errors) == len(results):
        raise RuntimeError(f"every trial failed; first error: {errors[0]}")
    best = results.get_best_result(metric=metric, mode=mode, filter_nan_and_inf=False)
    best_cfg = configlib.from_dict(pipeline.config_cls, best.config)
    version = pipeline.register(best_cfg, best, registry, inputs) if registry else None
    logging.getLogger("rayline").info(
        "best trial %s: %s=%s", best.path, metric, best.metrics.get(metric)
    )
    return best, version


def pipeline_metric(pipeline: Pipeline, cfg: Any) -> tuple[str, str]:
    """The metric and mode trials are compared by: the sweep's, else the pipeline's."""
    if cfg.sweep.metric:
        return cfg.sweep.metric, cfg.sweep.mode
    select_by = getattr(cfg, "select_by", None)
    if select_by == "rmse":
        return "valid_rmse", "min"
    return pipeline.metric, pipeline.mode


def _trial_name(trial) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)
