"""Every private corner of Ray that rayline reaches into, in one place, each with why and
what it bought; `problems()` says which of them the installed Ray no longer has in the
shape rayline expects (tests/test_raycompat.py fails naming them, so an upgrade of Ray
shows here and not as a silent no-op or an error at every trial result).

Written against Ray 2.60.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

AUTH_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Warns at every start of a local Ray how to turn token auth off, which rayline never
wants a user to do: set to ERROR by `rayline` (cli.init_ray)."""
TRAIN_STORAGE_LOGGER = "ray.train._internal.storage"
"""Logs "Checkpoint successfully created" at INFO once per checkpoint, streamed to the
console from every trial: set to WARNING in the trial (pipelines._quiet)."""
PRIVATE_LOGGERS = (AUTH_TOKEN_SETUP_LOGGER, TRAIN_STORAGE_LOGGER)


def quiet(logger_name: str, level: int) -> None:
    logging.getLogger(logger_name).setLevel(level)


def keep_trial_runtime_envs_empty() -> None:
    """Tune gives each trial a runtime env of its own holding PL_DISABLE_FORK (for PyTorch
    Lightning, which no rayline trial runs) and the driver's AWS keys
    (ray.tune.execution.class_cache). A runtime env keeps the trial and every actor it
    starts off the worker processes Ray starts ahead (a process start each, about 1 s on
    2 cores, on the way to the first env step; docs/dqn.md), and secrets never go in
    one: a cluster's nodes hold their own."""
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(
        [name for name in class_cache.ENV_VARS_TO_PROPAGATE if name.startswith("AWS_")]
    )


def forget_log_once_keys(prefix: str) -> None:
    """Forget ray.util.debug's "log once" keys that start with `prefix`. Tune's
    experiment-state encoder makes one such key from the text of each value JSON cannot
    hold, for ever: a DQN driver grew by 1.9 MB an hour from them alone (tracemalloc).
    Nothing is logged for them (the fallback logs at debug level)."""
    from ray.util import debug

    for key in [key for key in debug._logged if key.startswith(prefix)]:
        debug.reset_log_once(key)


def restored_callbacks(tuner) -> list:
    """The callbacks a `tune.Tuner.restore` brought back with its experiment (pickled
    with its run config; `Tuner` has no public getter): the MLflow tracking of a resumed
    run, which the end of the run tags and drains as a new run's."""
    return list(tuner._local_tuner.get_run_config().callbacks or [])


def serve_controller() -> Any:
    """Serve's controller (a detached named actor: the handle stays valid across its
    restarts). The front asks it where the replicas answer, the call Serve's own HAProxy
    manager makes."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def http_targets(controller: Any, app_name: str) -> list[tuple[str, int, str]]:
    """(ip, port, name) of every HTTP target of the application, its proxies included,
    from the controller's target groups (Serve's direct ingress: each replica's port)."""
    import ray
    from ray.serve._private.common import RequestProtocol

    groups = ray.get(controller.get_target_groups.remote(app_name), timeout=10)
    return [
        (target.ip, target.port, target.name)
        for group in groups
        if group.protocol == RequestProtocol.HTTP and group.app_name == app_name
        for target in group.targets
    ]


def session_and_temp_dirs() -> tuple[str, str]:
    """This process's Ray session folder and Ray's temp folder (/tmp/ray unless set):
    where Ray's dashboard writes Prometheus' service-discovery file, and links it from."""
    import ray

    node = ray._private.worker._global_node
    return node.get_session_dir_path(), node.get_temp_dir_path()


def use_loopback_node_address() -> None:
    """This driver's Ray takes 127.0.0.1 as the node's address, as the environment
    switch rayline.metrics_export.LOOPBACK_RAY_ENV tells the processes Ray starts:
    `ray_constants` read the switch when Ray was first imported."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def problems() -> list[str]:
    """What of the above the installed Ray lacks or has in another shape: one line per
    symbol, naming it; empty when every one is as rayline expects."""
    found = []

    def expect(what: str, check) -> None:
        try:
            ok = check()
        except Exception as exc:  # an import or attribute gone
            found.append(f"{what}: {type(exc).__name__}: {exc}")
            return
        if not ok:
            found.append(f"{what}: not in the shape rayline expects")

    def module(name: str):
        return importlib.import_module(name)

    class_cache = "ray.tune.execution.class_cache"
    expect(
        f"{class_cache}.DEFAULT_ENV_VARS",
        lambda: isinstance(module(class_cache).DEFAULT_ENV_VARS, dict),
    )
    expect(
        f"{class_cache}.ENV_VARS_TO_PROPAGATE",
        lambda: isinstance(module(class_cache).ENV_VARS_TO_PROPAGATE, set),
    )
    expect("ray.util.debug._logged", lambda: isinstance(module("ray.util.debug")._logged, set))
    tuner_internal = "ray.tune.impl.tuner_internal.TunerInternal"
    expect(
        f"{tuner_internal}.get_run_config",
        lambda: callable(module("ray.tune.impl.tuner_internal").TunerInternal.get_run_config),
    )
    expect(
        "ray.tune.Tuner._local_tuner",
        lambda: "_local_tuner" in module("ray.tune").Tuner.__annotations__,
    )
    expect(
        "ray.util.debug.reset_log_once", lambda: callable(module("ray.util.debug").reset_log_once)
    )
    constants = "ray.serve._private.constants"
    expect(f"{constants}.SERVE_CONTROLLER_NAME", lambda: module(constants).SERVE_CONTROLLER_NAME)
    expect(f"{constants}.SERVE_NAMESPACE", lambda: module(constants).SERVE_NAMESPACE)
    expect(
        "ray.serve._private.common.RequestProtocol.HTTP",
        lambda: module("ray.serve._private.common").RequestProtocol.HTTP,
    )
    controller = "ray.serve._private.controller.ServeController"
    for method in ("get_target_groups", "get_http_config"):
        expect(
            f"{controller}.{method}",
            lambda method=method: callable(
                getattr(module("ray.serve._private.controller").ServeController, method)
            ),
        )
    expect(
        "ray._private.node.Node.get_session_dir_path/get_temp_dir_path",
        lambda: all(
            callable(getattr(module("ray._private.node").Node, name))
            for name in ("get_session_dir_path", "get_temp_dir_path")
        ),
    )
    expect(
        "ray._private.worker._global_node",
        lambda: hasattr(module("ray._private.worker"), "_global_node"),
    )
    for name in PRIVATE_LOGGERS:
        expect(f"logger {name}", lambda name=name: importlib.util.find_spec(name) is not None)
    return found
