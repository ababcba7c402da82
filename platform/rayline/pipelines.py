"""Every pipeline, run the same way: a typed config, a Tune function trainable, and a
step that registers the best trial's model. `rayline train` is a one-trial Tune run,
`rayline sweep` the same trainable over the config's search space.

Tune is imported where it is used (2 CPU-seconds): `rayline train` imports it while Ray
starts (rayline.startup.import_in_background), and a refused config never pays for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rayline import config as configlib
from rayline import raycompat, runs, startup
from rayline.config import ConfigError, SweepConfig
from rayline.family import FAMILIES, Pipeline, get_pipeline
from rayline.store import ModelRegistry, ModelVersion


def builtin_pipelines() -> dict[str, Path]:
    """The pipeline files that ship with rayline (the repository's pipelines/, inside the
    package as rayline/builtin_pipelines): name -> file."""
    folder = Path(__file__).resolve().parent / "builtin_pipelines"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def pipeline_file(name_or_path: str | Path) -> Path:
    """A pipeline file: the path itself when it is one, else the built-in of that name
    (`dqn-cartpole` or `dqn-cartpole.yaml`)."""
    path = Path(name_or_path)
    if path.exists() or os.path.sep in str(name_or_path):
        return path
    builtin = builtin_pipelines().get(path.stem if path.suffix in (".yaml", ".yml") else path.name)
    if builtin is None:
        known = ", ".join(builtin_pipelines()) or "none"
        raise ConfigError(
            f"{name_or_path}: no such file, and no built-in pipeline of that name "
            f"(built-in: {known})"
        )
    return builtin


def load_pipeline(path: str | Path, overrides: dict[str, Any]) -> tuple[Pipeline, Any]:
    """Read a pipeline file (or a built-in pipeline by name), pick its pipeline by the
    `pipeline:` key, build its config."""
    path = pipeline_file(path)
    data = configlib.apply_overrides(configlib.read_yaml(path), overrides)
    if "pipeline" not in data:
        raise ConfigError(
            f"{path}: missing key 'pipeline' (expected one of {', '.join(sorted(FAMILIES))})"
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


class Interrupted(RuntimeError):
    """The run stopped before every trial ended; `--resume` continues it."""


@dataclasses.dataclass
class Outcome:
    """What a run ends with."""

    best: Any
    """The best trial's Tune Result."""
    version: ModelVersion | None
    """The best model as registered (None when run.register is off)."""
    results: Any
    """Every trial's Result (a Tune ResultGrid)."""
    experiment: str
    """Where the run's results and TensorBoard event files are (a path or URI)."""
    promotion: str | None = None
    """What `run.promote` did, in one line (None: it was `none`)."""


@dataclasses.dataclass
class Prepared:
    """What a run needs besides its config, checked before Ray starts."""

    registry: ModelRegistry | None
    inputs: dict


def prepare(pipeline: Pipeline, cfg: Any, resume: bool = False) -> Prepared:
    """Open the model store, check there is a run to resume, and load and check the
    pipeline's inputs: bad paths, bad data and bad values fail here, in the driver, with
    a clear error, before Ray starts."""
    if resume and not _can_restore(experiment_path(cfg)):
        raise ConfigError(f"run.name: nothing to resume at {experiment_path(cfg)}")
    if cfg.run.promote != "none" and not cfg.run.register:
        raise ConfigError(f"run.promote: {cfg.run.promote} needs run.register")
    if cfg.run.promote == "gated" and pipeline.compare is None:
        raise ConfigError(
            f"run.promote: gated: the {pipeline.name} family cannot compare versions yet "
            "(use always or none)"
        )
    if cfg.run.mlflow.registry and not cfg.run.mlflow.tracking_uri:
        raise ConfigError("run.mlflow.registry: needs run.mlflow.tracking_uri")
    if cfg.run.mlflow.tracking_uri:
        from rayline import mlflow_sync

        mlflow_sync.check_setting(cfg.run.mlflow.tracking_uri, "run.mlflow.tracking_uri")
    inputs = pipeline.prepare(cfg)  # first: a bad value creates no store folder
    registry = ModelRegistry(cfg.run.store_uri) if cfg.run.register else None
    return Prepared(registry, inputs)


def _can_restore(experiment: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment)


def experiment_path(cfg: Any) -> str:
    """Where Tune keeps the run: `run.storage_path/run.name` (a path or URI)."""
    return runs.run_path(cfg.run.storage_path, cfg.run.name)


def tune_settings() -> None:
    """How rayline runs Tune, for every caller of `run` (the CLI, a program, a benchmark)."""
    from rayline.startup import import_tensorboardx_without_torch

    import_tensorboardx_without_torch()  # before Tune builds its TensorBoard logger
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own header and `tensorboard --logdir` line name its staging folder under
    # /tmp/ray, not the results; rayline prints one line per trial and the true path.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's stop message names Tuner.restore; rayline's own line names --resume.
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    raycompat.keep_trial_runtime_envs_empty()


def run(
    pipeline: Pipeline,
    cfg: Any,
    *,
    sweep: bool,
    resume: bool = False,
    prepared: Prepared | None = None,
) -> Outcome:
    """Run the pipeline under Tune (one trial, or the sweep); register the best model.
    Ray must already be initialised."""
    from ray import tune

    tune_settings()
    prepared = prepared or prepare(pipeline, cfg, resume)
    registry, inputs = prepared.registry, prepared.inputs
    pipeline.check_cluster(cfg)
    experiment = experiment_path(cfg)
    trainable = _quiet(pipeline.trainable)
    trainable = tune.with_parameters(trainable, **inputs) if inputs else trainable
    trainable = tune.with_resources(trainable, pipeline.resources(cfg))
    metric, mode = pipeline_metric(pipeline, cfg)
    tracking = None
    if resume:
        # the tracking callback, if any, comes back with the experiment's own
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
        if cfg.run.mlflow.tracking_uri:
            from rayline import raycompat
            from rayline.mlflow_tracking import MLflowTracking

            restored = raycompat.restored_callbacks(tuner)
            tracking = next((c for c in restored if isinstance(c, MLflowTracking)), None)
    else:
        if cfg.run.mlflow.tracking_uri:
            from rayline.mlflow_tracking import tracking_callback

            tracking = tracking_callback(pipeline, cfg, sweep)
        tuner = new_tuner(
            pipeline, cfg, trainable, sweep, with_registry=registry is not None, tracking=tracking
        )
    runs.started(experiment, pipeline.name, cfg.run.name, sweep, metric, mode, resume)
    startup.mark("tuner_built")
    if "loaded" in startup.MARKS:  # `rayline train`'s start-up so far: where its seconds went
        runs.record(
            experiment, startup={"launch": startup.process_started_unix_s(), **startup.MARKS}
        )
    try:
        with _interrupt_flag() as interrupted:
            results = tuner.fit()
        if interrupted.is_set():
            runs.record(experiment, status="interrupted")
            raise Interrupted(f"continue with --resume (state saved in {experiment})")
        errors = [r.error for r in results if r.error]
        if errors and len(errors) == len(results):
            raise RuntimeError(f"every trial failed; first error: {errors[0]}")
        best = best_result(results, metric, mode)
        best_cfg = configlib.from_dict(pipeline.config_cls, best.config)
        version = pipeline.register(best_cfg, best, registry, inputs) if registry else None
    except Exception as exc:
        if not isinstance(exc, Interrupted):
            runs.record(experiment, status="failed", error=f"{type(exc).__name__}: {exc}")
        if tracking is not None:
            tracking.finish("KILLED" if isinstance(exc, Interrupted) else "FAILED")
        raise
    registered, promotion = None, None
    if version is not None:
        registered = {"name": version.name, "version": version.version, "store": registry.uri}
        promotion = promote_registered(cfg, registry, version)
        if tracking is not None:
            tracking.registered(str(best.metrics.get("trial_id")), version, registry)
    if tracking is not None:
        tracking.finish()  # the trial's run tagged first: the mirror finds it by the tag
    if version is not None and cfg.run.mlflow.registry:
        from rayline import mlflow_sync

        mlflow_sync.mirror(
            cfg.run.mlflow.tracking_uri, registry, version.name, cfg.run.mlflow.timeout_s
        )
    runs.record(
        experiment,
        status="finished",
        best_trial=str(best.path),
        registered=registered,
        promotion=promotion,
        ended_at=time.time(),
    )
    logging.getLogger("rayline").info(
        "best trial %s: %s=%s", best.path, metric, best.metrics.get(metric)
    )
    return Outcome(best, version, results, experiment, promotion)


def new_tuner(
    pipeline: Pipeline,
    cfg: Any,
    trainable: Any,
    sweep: bool,
    with_registry: bool,
    tracking: Any = None,
):
    """A Tuner of the trainable: one trial, or the sweep with its search and scheduler;
    `tracking`, a Tune callback more (MLflow's)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayline.trial_lines import ForgetEncodedStates, TrialLines, WarmImports

    metric, mode = pipeline_metric(pipeline, cfg)
    config = configlib.to_dict(cfg)
    storage = _absolute(cfg.run.storage_path)
    scheduler = None
    if sweep and cfg.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr=pipeline.time_attr,
            max_t=cfg.sweep.max_t or pipeline.max_budget(cfg),
            grace_period=cfg.sweep.grace_period,
            reduction_factor=cfg.sweep.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=search_space(config, cfg.sweep) if sweep else config,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=cfg.sweep.num_samples if sweep else 1,
            scheduler=scheduler,
            search_alg=search_algorithm(cfg.sweep) if sweep else None,
            # A trial's process outlives it: the next trial skips the ~2 s of
            # starting Python and importing Tune and XGBoost.
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            # One line per finished trial instead of Tune's wide tables.
            verbose=0,
            callbacks=[
                TrialLines(metric, list(cfg.sweep.params) if sweep else [], pipeline.progress),
                WarmImports(pipeline.register_imports if with_registry else ()),
                ForgetEncodedStates(),
                *([tracking] if tracking is not None else []),
            ],
            # Tune writes its experiment state (what --resume reads) on its clock,
            # every 10 s or more, and at once after every `num_to_keep`-th checkpoint
            # of a trial: with 1, each checkpoint is in the state as soon as it is
            # kept (a driver killed before the clock came round resumed a trial from
            # zero beside a checkpoint on disk). A clock of 1 s did that too, but cost
            # sweeps their time and the driver ~40 MB an hour (benchmarks/soak.py).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # A trial whose learner or replay died resumes from its last checkpoint.
            failure_config=tune.FailureConfig(max_failures=2),
        ),
    )


def promote_registered(cfg: Any, registry: ModelRegistry, version: ModelVersion) -> str | None:
    """`run.promote` for the version just registered; one line saying what it did."""
    alias = cfg.run.promote_alias
    if cfg.run.promote == "always":
        registry.promote(version.name, version.version, alias)
        return f"{alias} -> {version.name} v{version.version}"
    if cfg.run.promote == "gated":
        from rayline.compare import promote_gated

        return promote_gated(
            registry, version.name, version.version, alias, cfg.run.promote_min_delta
        ).message
    return None


def search_algorithm(sweep: SweepConfig):
    """Tune's searcher for `sweep.search`, seeded, at most `max_concurrent_trials` at once."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if sweep.search == "random":
        return BasicVariantGenerator(
            random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials
        )
    if any("grid" in spec for spec in sweep.params.values()):
        raise ConfigError("sweep.search: optuna cannot search a grid; use choice instead")
    try:
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=sweep.seed)
    except (ImportError, AssertionError):  # Ray asserts that optuna is importable
        raise ConfigError("sweep.search: optuna is not installed (pip install optuna)") from None
    if sweep.max_concurrent_trials:
        return ConcurrencyLimiter(searcher, sweep.max_concurrent_trials)
    return searcher


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) or SIGTERM (`ray job stop`, Kubernetes) during a run asks Tune to
    stop gracefully (it saves the experiment for --resume, as on its own SIGUSR1) and is
    remembered, so that a run cut short is never mistaken for a finished one and its
    partial best never registered."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_interrupt(signum, frame):
        flag.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


def best_result(results, metric: str, mode: str):
    """The best trial by its last `metric`. Where trials checkpoint, only those that left
    a checkpoint count: a trial ASHA stopped between checkpoints has no model to register."""
    scored = [r for r in results if r.error is None and metric in (r.metrics or {})]
    if not scored:
        raise RuntimeError(f"no trial reported {metric!r}")
    with_model = [r for r in scored if r.checkpoint is not None]
    pick = max if mode == "max" else min
    return pick(with_model or scored, key=lambda r: r.metrics[metric])


def pipeline_metric(pipeline: Pipeline, cfg: Any) -> tuple[str, str]:
    """The metric and mode trials are compared by: the sweep's, else the pipeline's."""
    if cfg.sweep.metric:
        return cfg.sweep.metric, cfg.sweep.mode
    if pipeline.select is not None:
        return pipeline.select(cfg)
    return pipeline.metric, pipeline.mode


def _quiet(trainable: Callable) -> Callable:
    """The trainable, with Ray Train's "Checkpoint successfully created" INFO lines (one
    per checkpoint, streamed to the console from the trial's process) kept out."""

    def run_quietly(config: dict, **inputs):
        raycompat.quiet(raycompat.TRAIN_STORAGE_LOGGER, logging.WARNING)
        return trainable(config, **inputs)

    # Tune names trials after the function; its inputs are found through __wrapped__.
    run_quietly.__name__ = trainable.__name__
    run_quietly.__wrapped__ = trainable
    return run_quietly


def _trial_name(trial) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)
