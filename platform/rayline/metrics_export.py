"""Where Prometheus finds a Ray that `rayline serve` or `rayline train` starts.

Ray exports every process's metrics (rayline's `ray_rayline_*` among them) on each node's
metrics port. On a cluster that `ray start` made, the head's dashboard writes the node
list for Prometheus' file service discovery to /tmp/ray/prom_metrics_service_discovery.json.
A Ray of rayline's own runs without the dashboard (a few hundred MB and a second of start
that serving never uses), so nothing wrote that file and its port was a random one:
rayline now fixes the port (`--metrics-port`), writes the same file in the same place,
and prints the address. One Prometheus scrape config serves both (docs/serving.md).

That Ray listens on loopback only unless `--metrics-host 0.0.0.0` says otherwise: Ray's
own servers listen on every interface of a node by default, its metrics port among them
(which no token guards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable

from rayline.config import ConfigError

SERVE_METRICS_PORT = 8080
"""`rayline serve`'s default metrics port (Ray's documentation uses 8080 too)."""
TRAIN_METRICS_PORT = 8081
"""`rayline train` and `sweep`'s: beside a `rayline serve` on the same machine."""
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"
"""The name Ray's dashboard gives the file (in the session folder, linked from /tmp/ray)."""
LOOPBACK_HOST = "127.0.0.1"
EVERY_INTERFACE = "0.0.0.0"
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_RAY_ENV = {LOOPBACK_SWITCH: "0"}
"""Ray's switch for a one-machine Ray (its default on macOS and Windows): the node's
address is 127.0.0.1 and every server Ray starts (GCS, raylet, the metrics port) listens
there alone. tests/test_raycompat.py checks that it still does."""


@dataclasses.dataclass(frozen=True)
class MetricsExport:
    """Where the metrics of a Ray that rayline starts are exported."""

    port: int
    """0: any free port (Ray picks one; the printed address names it)."""
    host: str = LOOPBACK_HOST

    def env_vars(self) -> dict[str, str]:
        """Set in the environment before Ray starts (Ray's processes inherit it)."""
        return dict(LOOPBACK_RAY_ENV) if self.host == LOOPBACK_HOST else {}

    def apply_to_this_process(self) -> None:
        """Before `ray.init`: Ray read the switch when it was imported (in the background
        while the command checked its arguments), so it is set on Ray's module too."""
        if self.host == LOOPBACK_HOST and os.environ.get(LOOPBACK_SWITCH) == "0":
            from rayline import raycompat

            raycompat.use_loopback_node_address()

    def ray_init_kwargs(self) -> dict:
        return {"_metrics_export_port": self.port} if self.port else {}


def add_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """`--metrics-port` and `--metrics-host` for a command that may start a Ray."""
    parser.add_argument(
        "--metrics-port",
        type=port_number(0),
        default=None,
        help=f"where the Ray this command starts exports its metrics for Prometheus (default "
        f"{default_port}; 0: any free port). A cluster's nodes export on their own "
        "`ray start --metrics-export-port`",
    )
    parser.add_argument(
        "--metrics-host",
        choices=[LOOPBACK_HOST, EVERY_INTERFACE],
        default=LOOPBACK_HOST,
        help="127.0.0.1 (default): the Ray this command starts, its metrics port included, "
        "listens on loopback only; 0.0.0.0: on every interface, for a Prometheus on "
        "another machine",
    )
    parser.set_defaults(default_metrics_port=default_port)


def checked(args: argparse.Namespace, joining_a_cluster: bool) -> MetricsExport | None:
    """The export asked for, its port checked free before Ray starts (ConfigError); None
    when joining a cluster, whose nodes export on their own ports, or when this process
    runs a Ray already (`rayline.cli.main` called from a program: init_ray keeps it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and args.metrics_port is None:
        return None
    if joining_a_cluster:
        if args.metrics_port is not None or args.metrics_host != LOOPBACK_HOST:
            raise ConfigError(
                "--metrics-port/--metrics-host: set for a Ray rayline starts; a cluster's "
                "nodes export on `ray start --metrics-export-port`"
            )
        return None
    port = args.default_metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        check_port_free(args.metrics_host, port, "--metrics-port")
    return MetricsExport(port, args.metrics_host)


def publish_scrape_target() -> str:
    """After a Ray of rayline's own started: write Prometheus' service-discovery file as
    Ray's dashboard would (in the session folder, atomically, linked from Ray's temp
    folder) and say where it is and what it lists."""
    import ray

    from rayline import raycompat

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    session_dir, temp_dir = raycompat.session_and_temp_dirs()
    written = os.path.join(session_dir, SERVICE_DISCOVERY_FILE)
    partial = f"{written}.tmp"
    with open(partial, "w") as f:
        json.dump([{"labels": {"job": "ray"}, "targets": [target]}], f)
    os.replace(partial, written)  # Prometheus never reads half a file
    linked = os.path.join(temp_dir, SERVICE_DISCOVERY_FILE)
    if os.path.realpath(linked) != written:
        partial_link = f"{linked}.{os.getpid()}.tmp"
        os.symlink(written, partial_link)
        os.replace(partial_link, linked)  # the latest Ray on this machine, as Ray does
    return f"metrics for Prometheus at http://{target}/metrics (file_sd_configs: {linked})"


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse, before Ray starts, a port another program holds: a server would quietly
    bind the next one, or fail long after the user left."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As servers do: a port left in TIME_WAIT by an earlier run is free, one that
        # another program listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"{what}: {host}:{port} is not free ({exc.strerror}); choose another {what}"
            ) from None


def port_number(lowest: int) -> Callable[[str], int]:
    """An argparse type: a port number from `lowest` to 65535 (0: any free port)."""

    def parse(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
        if not lowest <= port <= 65535:
            raise argparse.ArgumentTypeError(f"expected a port from {lowest} to 65535, got {port}")
        return port

    return parse
