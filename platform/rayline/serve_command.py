"""`rayline serve`: every promoted model over HTTP, on a Ray of its own or a cluster's.

Everything that can be wrong with the arguments (the store, the models, the canary
shares, the API key, a port taken) is said in one line, exit 2, before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from rayline import metrics_export
from rayline.config import ConfigError
from rayline.memory import ALLOCATOR_ENV
from rayline.metrics_export import MetricsExport, check_port_free
from rayline.serving.settings import (
    API_KEY_ENV,
    APP_NAME,
    ServeArgs,
    api_key_sha256,
    check_canaries,
    direct_ingress_env,
    served_models,
)
from rayline.startup import init_ray
from rayline.store import ModelRegistry


@dataclasses.dataclass
class Plan:
    """What `rayline serve` found true of its arguments, before Ray starts."""

    registry: ModelRegistry
    kinds: dict[str, str]
    """The models to serve: name -> kind."""
    names: list[str]
    """The models the app is given: those served and those refused (listed, with why,
    by /models)."""
    canary_fraction: dict[str, float]
    key_hash: str | None
    direct: bool
    """Serve's direct ingress behind rayline's front (a Ray of its own), or Serve's
    proxy on --port (a cluster's)."""
    proxy_port: int
    env_vars: dict[str, str]
    metrics: MetricsExport | None
    """Where a Ray of its own exports its metrics (None: a cluster's)."""


def run(args: argparse.Namespace) -> int:
    plan = checked(args)
    # The key is read: out of the environment before Ray starts, whose every process
    # would inherit it (only its hash travels to the replicas).
    os.environ.pop(API_KEY_ENV, None)
    os.environ.update(plan.env_vars)  # before Serve is imported
    from rayline.startup import import_in_background

    # Serve and the app's modules (a CPU-second) load while Ray starts its processes.
    importing = import_in_background(["ray.serve", "rayline.serving.app"])
    # Serve's controller and proxy run for weeks.
    scrape = init_ray(args.address, {**ALLOCATOR_ENV, **plan.env_vars}, plan.metrics)
    importing.join()
    serve_until_stopped(args, plan, scrape)
    return 0


def checked(args: argparse.Namespace) -> Plan:
    """Every argument checked against the store and the machine (ConfigError, exit 2)."""
    from rayline.family import served_kinds

    registry = ModelRegistry(args.store, create=False, read_only=True)
    listed = [n for n in args.models.split(",") if n]
    kinds, refused = served_models(registry, args.alias, listed, served_kinds())
    if not kinds and not refused:
        raise ConfigError(
            f"--store {args.store}: no model has alias {args.alias!r}; "
            f"promote one with `rayline models promote NAME VERSION`"
        )
    for name, reason in refused.items():  # one unreadable model never hides the others
        print(f"rayline: not serving {name}: {reason}", file=sys.stderr)
    if not kinds:
        raise ConfigError(f"--store {args.store}: none of {', '.join(refused)} can be served")
    names = [*kinds, *refused]  # the app lists the refused under /models, with why
    if not 0.0 <= args.prediction_log_sample <= 1.0:
        raise ConfigError(
            f"--prediction-log-sample: expected a share in [0, 1], got {args.prediction_log_sample}"
        )
    if args.mlflow:
        from rayline import mlflow_sync

        mlflow_sync.check_setting(args.mlflow, "--mlflow")
    canary_fraction = dict(args.canary_fraction)
    try:  # the app's own check, before Ray starts
        check_canaries(ServeArgs(canary_fraction=canary_fraction, shadow=args.shadow), kinds)
    except ConfigError as exc:
        flag = "--shadow" if str(exc).startswith("shadow") else "--canary-fraction"
        raise ConfigError(f"{flag}: {exc}") from None
    try:  # fail closed: a key file named but unreadable is an error, not an open server
        key_hash = api_key_sha256(args.api_key_file or "")
    except ConfigError as exc:
        raise ConfigError(f"--api-key-file: {exc}") from None
    if key_hash is None and not _loopback(args.host) and not args.allow_no_key:
        raise ConfigError(
            f"--host {args.host}: answering beyond this machine without an API key; give "
            "one (--api-key-file, $RAYLINE_API_KEY_FILE or $RAYLINE_API_KEY) or say "
            "--allow-no-key"
        )
    # Direct ingress needs its flags in every Serve process: only when we start the Ray.
    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))
    direct = not (args.no_direct or joining)
    proxy_port = args.port + 100 if direct else args.port
    for port, what in ((args.port, "--port"), (proxy_port, "Serve's proxy port (--port + 100)")):
        check_port_free(args.host, port, what)
    metrics = metrics_export.checked(args, joining_a_cluster=joining)
    env_vars = direct_ingress_env(args.port) if direct else {}
    return Plan(
        registry, kinds, names, canary_fraction, key_hash, direct, proxy_port, env_vars, metrics
    )


def serve_until_stopped(args: argparse.Namespace, plan: Plan, scrape: str | None) -> None:
    """The app on the Ray joined, its address, curl lines and metrics address (`scrape`)
    printed; until Ctrl-C or SIGTERM, then Serve drained."""
    import time

    from ray import serve

    from rayline.serving.app import build_app

    # rayline prints the one true address below; Serve's own "ready at" names its proxy.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # SIGTERM (Kubernetes, `kill`) stops it as Ctrl-C does, Serve shut down first; after
    # ray.init, whose own handler exits at once.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    mirroring = None
    try:
        # Serve's controller and proxy narrate every step at INFO; the console shows
        # their warnings and errors, and rayline's own lines.
        serve.start(
            http_options={"host": args.host, "port": plan.proxy_port},
            logging_config={"log_level": "WARNING"},
        )
        app_args = {
            "store_uri": args.store,
            "alias": args.alias,
            "models": plan.names,
            "canary_fraction": plan.canary_fraction,
            "shadow": args.shadow,
            "replicas": args.replicas,
        }
        if args.prediction_log:
            app_args["prediction_log"] = {
                "uri": args.prediction_log,
                "sample": args.prediction_log_sample,
                "flush_s": args.prediction_log_flush_s,
            }
        if plan.direct:  # rayline's front on --port, the replicas on ports above it
            app_args.update(front_port=args.port, front_host=args.host)
        if plan.key_hash:
            app_args["api_key_sha256"] = plan.key_hash
        serve.run(
            build_app(app_args),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        url = f"http://{args.host}:{args.port}"
        print(
            f"serving {', '.join(f'{n} ({k})' for n, k in plan.kinds.items())} at {url}; Ctrl-C stops"
        )
        if plan.direct:
            print(
                f"  (rayline's front before the gateway replicas' own ports; "
                f"Serve's proxy is on port {plan.proxy_port})"
            )
        _print_endpoints(url, plan.kinds, plan.registry, args.alias)
        if scrape:
            print(f"  {scrape}")
        if args.mlflow:
            mirroring = _mirror_to_mlflow(args.mlflow, plan)
        while True:
            time.sleep(1)
    finally:
        if mirroring is not None:
            mirroring.set()
        if args.address or os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
        else:
            # The Ray is this process's own and ends with it: the application is drained
            # and deleted, and Serve's actors go with the Ray (serve.shutdown's controller
            # kills itself mid-call, which Ray reports on the console as a failed task).
            serve.delete(APP_NAME)


def _mirror_to_mlflow(uri: str, plan: Plan):
    """MLflow's Model Registry kept in step with the served models from a thread of this
    process (mlflow_sync.follow); the event that stops it."""
    import threading

    from rayline import mlflow_sync

    stop = threading.Event()
    names = list(plan.kinds)
    thread = threading.Thread(
        target=mlflow_sync.follow,
        args=(uri, plan.registry, names, stop),
        name="rayline-mlflow",
        daemon=True,
    )
    thread.start()
    print(f"  mirroring {', '.join(names)} to MLflow at {mlflow_sync.shown(uri)}")
    return stop


def _loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _print_endpoints(url: str, kinds: dict[str, str], registry: ModelRegistry, alias: str) -> None:
    """A curl line for each endpoint of each served model."""
    from rayline.family import served_kinds

    print(f"  curl {url}/healthz")
    print(f"  curl {url}/models")
    print(f"  {url}/docs (OpenAPI)")
    served = served_kinds()
    for name, kind in kinds.items():
        for line in served[kind].examples(url, name, registry.get(name, alias), registry):
            print(f"  {line}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
