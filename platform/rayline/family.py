"""What a family (rl/, boosting/, recsys/, vision/) declares so the runner can run it and
the Serve app can serve what it registers: its `Pipeline`, with the kinds it serves and
their routes. A family module exports `PIPELINE = Pipeline(...)`; the runner
(rayline.pipelines), the CLI and the Serve app find it by the family list below and
know nothing else about it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from rayline.config import ConfigError
from rayline.serving.base import ServedKind
from rayline.store import ModelRegistry, ModelVersion

CONSOLE_KEY = "console"
"""A result's lines for the user's console: the trainable reports them, the driver of the
run prints them (a trial's own prints reach the console behind Ray's worker prefix)."""


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
    time_attr: str = "training_iteration"
    """The result field ASHA counts a trial's budget in."""
    step_key: str = ""
    """The result field a metric's series is plotted against in MLflow (empty:
    `time_attr`): env steps for DQN, epochs for vision, boosting rounds for XGBoost."""
    max_budget: Callable[[Any], int] = lambda cfg: 100
    """cfg -> the most budget (in `time_attr`) any trial can use: ASHA's max_t."""
    check_cluster: Callable[[Any], None] = lambda cfg: None
    """cfg -> None; raises ConfigError, before any trial starts, when the running cluster
    cannot hold a trial of this config."""
    select: Callable[[Any], tuple[str, str]] | None = None
    """cfg -> (metric, mode) when the config chooses what trials are compared by; else
    `metric` and `mode` (a sweep's own `sweep.metric` comes first either way)."""
    serves: dict[str, ServedKind] = dataclasses.field(default_factory=dict)
    """Registry kind -> how the Serve app serves the models this pipeline registers."""
    compare: Callable[[ModelRegistry, ModelVersion, ModelVersion, int], Any] | None = None
    """(registry, version a, version b, samples) -> rayline.compare.Comparison: both
    versions scored on the same evaluation (None: this family cannot compare yet)."""
    register_imports: tuple[str, ...] = ()
    """Modules `register` imports on use (torch, for one): the driver imports them in the
    background once the first trial reports, so registration does not wait on them."""
    progress: Callable[[dict], str | None] = lambda result: result.get(CONSOLE_KEY)
    """A trial's result -> the lines the console shows for it (None: none). By default
    what the trainable put under CONSOLE_KEY."""


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
        if k not in TUNE_KEYS and k != CONSOLE_KEY and isinstance(v, (int, float, bool, str))
    }


def trial_record(result) -> dict:
    """Where a registered model came from: its Tune trial and checkpoint."""
    record = {"trial_id": result.metrics.get("trial_id"), "path": result.path}
    if result.checkpoint is not None:
        record["checkpoint"] = result.checkpoint.path
    return record


FAMILIES = {
    "dqn": "rayline.rl.pipeline",
    "recommender": "rayline.recsys.pipeline",
    "xgboost": "rayline.boosting.pipeline",
    "transfer": "rayline.vision.classification",
    "fcn": "rayline.vision.segmentation",
}
"""Pipeline name -> the family module that exports it as PIPELINE. Imported on use, so
`rayline models` never pays for torch or XGBoost. A new pipeline is its folder and a
line here and in SERVING. The runner, the CLI and the Serve app all ask these lists."""
SERVING = {
    "dqn": "rayline.rl.served",
    "recommender": "rayline.recsys.served",
    "xgboost": "rayline.boosting.served",
    "transfer": "rayline.vision.served",
    "fcn": "rayline.vision.served",
}
"""Pipeline name -> the module that declares the kinds it serves (SERVED: kind ->
ServedKind), light to import: `rayline serve` checks a store's models without torch,
scikit-learn or XGBoost, and a replica imports only what the models it loads need."""


def get_pipeline(name: Any) -> Pipeline:
    if not isinstance(name, str) or name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"pipeline: expected one of {known}, got {name!r}")
    return importlib.import_module(FAMILIES[name]).PIPELINE


def served_kinds() -> dict[str, ServedKind]:
    """Every registry kind some family serves, and how: what the Serve app loads and
    `rayline serve` shows, asked of the families in FAMILIES."""
    kinds: dict[str, ServedKind] = {}
    for module in dict.fromkeys(SERVING.values()):
        kinds.update(importlib.import_module(module).SERVED)
    return kinds


def pipeline_of_kind(kind: str) -> Pipeline | None:
    """The family's pipeline that registers and serves models of `kind`."""
    for name in FAMILIES:
        pipeline = get_pipeline(name)
        if kind in pipeline.serves:
            return pipeline
    return None
