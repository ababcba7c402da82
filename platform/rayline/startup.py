"""Start-up, measured: when this process was created (from /proc), and named marks after
it. `rayline train` marks the driver's steps, a trainable and each actor its own, so a
benchmark can say where the seconds from launch to the first env step go."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time

from rayline.metrics_export import MetricsExport, publish_scrape_target

MARKS: dict[str, float] = {}
"""Mark name -> unix time, in this process (the first time each is marked)."""


def process_started_unix_s(pid: int | str = "self") -> float:
    """When process `pid` was created, as unix time (nan where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return float("nan")
    # The boot's unix time to the microsecond: /proc/stat's btime is whole seconds, which
    # put every process's creation up to a second early against time.time() marks.
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def mark(name: str) -> float:
    """Record `name` now, once; its time."""
    return MARKS.setdefault(name, time.time())


class ActorStart:
    """An actor's own start: its process's creation, its constructor's start and end."""

    def __init__(self):
        self.process = process_started_unix_s()
        self.constructing = time.time()
        self.ready = float("nan")

    def constructed(self) -> None:
        self.ready = time.time()

    def times(self) -> tuple[float, float, float]:
        return self.process, self.constructing, self.ready


def import_in_background(modules: list[str]) -> threading.Thread:
    """Import `modules` in a thread while this one goes on: `rayline train` imports Tune
    (2 CPU-seconds) while Ray starts, which mostly waits on its own processes. One that
    is not installed is skipped."""

    def run() -> None:
        for module in modules:
            # An optional one (tensorboardX) that is missing: its user says so on use.
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(module)

    thread = threading.Thread(target=run, name="rayline-imports", daemon=True)
    thread.start()
    return thread


def import_tensorboardx_without_torch() -> None:
    """Import tensorboardX, which Tune's TensorBoard logger loads before the first trial,
    without the torch it imports only to accept torch tensors (Tune passes it numbers):
    1.7-4 CPU-seconds on 2 cores that `rayline train` spent while Ray started. A process
    that has torch already keeps it; one that needs it later imports it as usual. Call
    it before threads that might import torch start."""
    if "tensorboardX" in sys.modules:
        return
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError, as without torch
    try:
        with contextlib.suppress(ModuleNotFoundError):  # tensorboardX is optional
            importlib.import_module("tensorboardX")
    finally:
        if hidden:
            del sys.modules["torch"]


HEALTH_GROUP = {"health": 1}
"""A run's actors' concurrency group for `ping` (`@ray.remote(concurrency_groups=...)`):
a thread of its own, so that an actor busy in a long call still answers, and one that
does not answer is hung (its process stopped, its node frozen), not busy. Their other
methods still run one at a time, in their default group."""


def exit_quietly_on_sigterm() -> None:
    """Ray stops a run's actors with SIGTERM when the run ends, and its handler raises
    SystemExit wherever the actor is: often inside a finalizer (gymnasium's
    VectorEnv.__del__, Ray's own ActorHandle.__del__ in the learner, which holds the
    replay shards' handles), which prints a traceback to the user's console for a normal
    stop. The run's actors keep nothing that this moment must save (the driver has their
    checkpoints; files are written atomically): they exit at once, quietly."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
"""Credentials the driver's own clients read (MLflow's, rayline.mlflow_sync) and that no
Ray process may inherit: a local Ray is started without them."""


def ray_data_env(cpus: int) -> dict[str, str]:
    """Ray Data settings for a Ray on one machine of `cpus` CPUs. A Parquet read lists
    each file's footer on a pool of actors, 32 by default (sized for a cluster); on one
    machine the ones beyond its CPUs only queue, and Ray still started a worker process
    for each of them: a data-parallel XGBoost run on 2 cores spent 75 CPU-seconds with the
    default pool and 56 with one actor, for the same model (docs/xgboost.md)."""
    return {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": str(max(1, cpus))}


def init_ray(
    address: str | None,
    env_vars: dict[str, str] | None = None,
    metrics: MetricsExport | None = None,
) -> str | None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a private local Ray
    whose processes all start with `env_vars` and `ray_data_env`'s settings (a value the
    user set wins). They are set
    in this process's environment, which Ray's processes inherit, not in a runtime env:
    an actor with a runtime env takes no worker Ray started ahead (about a second each on
    2 cores, the first env step's path; docs/dqn.md). A Ray of its own exports metrics
    as `metrics` says (rayline.metrics_export): the line saying where, to print, else None."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():  # called from a program that already runs Ray
        return None
    if address:  # a cluster: `ray job submit` sets RAY_ADDRESS for the job
        ray.init(address=address, logging_level=logging.WARNING)
        return None
    # embedded: always a private cluster, never one left by another `ray start`
    metrics = metrics or MetricsExport(0)
    settings = {**ray_data_env(os.cpu_count() or 1), **(env_vars or {}), **metrics.env_vars()}
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    metrics.apply_to_this_process()
    # Token auth stays on (Ray's default for a new local cluster); Ray's warning at
    # every start says how to turn it off, which rayline never wants a user to do.
    from rayline import raycompat

    raycompat.quiet(raycompat.AUTH_TOKEN_SETUP_LOGGER, logging.ERROR)
    # Ray's processes inherit this process's environment when they start: they start
    # without the driver's secrets, which are put back for the driver once they have.
    hidden = {name: os.environ.pop(name) for name in SECRET_ENV_VARS if name in os.environ}
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            **metrics.ray_init_kwargs(),
        )
    finally:
        os.environ.update(hidden)
    return publish_scrape_target()
