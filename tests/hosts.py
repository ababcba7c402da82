"""A Ray cluster of "hosts" on one machine: each node in its own Linux network namespace
with its own address, started with `ray start` as a cluster operator starts one.

    with host_cluster(tmp_path, workers=[{"num_cpus": 1, "resources": {"collector": 8}}]) as c:
        c.laptop.run(["ray", "job", "submit", f"--address={c.dashboard_url}", "--", ...])
        c.kill("worker1")

The hosts hang off a bridge in a namespace of its own ("switch") on 198.18.0.0/24, a range
reserved for benchmarking and routed nowhere: the head is 198.18.0.1, worker k is
198.18.0.(k+1). The "laptop" namespace has one cable, to the head (198.19.0.0/24), and the
head forwards nothing, so the laptop reaches the head's ports and no other host's. Nothing
is added to this machine's own network namespace.

Token auth is on for every node and client (the token in a 0600 file named by
RAY_AUTH_TOKEN_PATH, never in an argument or an environment value). Each node runs in a
PID namespace of its own (`unshare --pid --fork --kill-child`), so killing it kills exactly
the processes it started: never `ray stop`, never a match by name. `close()` kills every
host, checks with `ip netns pids` that nothing is left, and removes the namespaces.
docs/cluster.md says what was found on the way (Ray in network namespaces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HEAD_ADDRESS = "198.18.0.1"
LAPTOP_ADDRESS = "198.19.0.2"
HEAD_LAPTOP_ADDRESS = "198.19.0.1"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
BIN = Path(sys.executable).parent
NODE_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}
"""How often the head checks each node: a host that vanishes (no reset, only silence) is
found dead in ~5-10 s, where Ray's defaults (3 s, 10 s, 5 failures) take 30-65 s. An
operator's setting, in every node's environment; pass `env` to change it."""


def namespaces_unavailable() -> str | None:
    """Why host clusters cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"rlprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_CLUSTERS = itertools.count(1)
_NAMESPACE = re.compile(r"^rl(\d+)x\d+-\w+$")


def sweep_stale() -> list[str]:
    """Remove the namespaces (and kill the processes in them) of host clusters whose
    process is gone without tearing down (SIGKILL, a power cut); returns their names.
    Only names this module makes (rl<pid>x<n>-<host>) whose <pid> is not running."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    swept = []
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAMESPACE.match(name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its cluster's process is alive: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        swept.append(name)
    return swept


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclasses.dataclass
class Host:
    """One namespace: a node of the cluster (head, workerK) or the laptop."""

    name: str
    namespace: str
    address: str
    home: Path
    env: dict[str, str]
    node: subprocess.Popen | None = None

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside this host's namespace with its environment."""
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run(
            self.command(argv), env=env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def popen(
        self, argv: list[str], log: Path, own_pids: bool = False, **kwargs
    ) -> subprocess.Popen:
        """Start `argv` in this host's namespace, logging to `log`. With `own_pids` in a
        PID namespace of its own too, so that killing the returned process kills all it
        started (a node; a driver cannot be: its node's raylet must see its pid)."""
        env = {**self.env, **kwargs.pop("env", {})}
        if own_pids:
            argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *argv]
        return subprocess.Popen(
            self.command(argv),
            env=env,
            stdout=open(log, "ab"),  # noqa: SIM115 - the child holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )

    def pids(self) -> list[int]:
        """Every process in this host's network namespace."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True
        )
        return [int(pid) for pid in done.stdout.split()]

    def connects(self, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connect from this host to address:port succeeds."""
        probe = (
            "import socket,sys\n"
            "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
            "except OSError: sys.exit(1)\n"
        )
        done = self.run(
            [sys.executable, "-S", "-c", probe, address, str(port), str(timeout)],
            timeout=timeout + 30,
        )
        return done.returncode == 0


LOAD_CLIENT = """
import http.client, json, sys, time
host, port, path, body, seconds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6]
deadline = time.time() + seconds
with open(out, "w") as log:
    while time.time() < deadline:
        started = time.time()
        try:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            status, answer = reply.status, reply.read().decode(errors="replace")
            connection.close()
        except OSError as error:
            status, answer = 0, repr(error)
        log.write(json.dumps([started, time.time(), status, answer[:300]]) + "\\n")
        log.flush()
"""


def http_load(
    host: Host, address: str, port: int, path: str, body: dict, seconds: float, out: Path
):
    """One client on `host` POSTing `body` to address:port/path back to back for
    `seconds`, each request a new connection (a client that reconnects as users do);
    `out` gets a JSON line per request: [sent, answered, status (0: no answer), body]."""
    argv = [sys.executable, "-S", "-c", LOAD_CLIENT, address, str(port), path]
    argv += [json.dumps(body), str(seconds), str(out)]
    return host.popen(argv, out.with_suffix(".log"))


class HostCluster:
    """A head, `len(workers)` worker hosts and a laptop; see the module's docstring.
    `workers` entries: {"num_cpus": N, "resources": {...}}, with "later": True for a host
    whose node joins only when `start_later` is called (a replacement for a lost host,
    its resources out of reach until then). `env` reaches every node's `ray start`
    (Serve's direct ingress flags, for example)."""

    def __init__(
        self,
        root: Path,
        workers: list[dict],
        head_cpus: float = 1,
        head_resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        object_store_mb: int = 300,
    ):
        self.root = Path(root)
        self.workers_spec = workers
        self.head_cpus = head_cpus
        self.head_resources = head_resources or {}
        self.node_env = {**NODE_HEALTH_CHECKS, **(env or {})}
        self.object_store_mb = object_store_mb
        self.prefix = f"rl{os.getpid()}x{next(_CLUSTERS)}"
        self.switch = f"{self.prefix}-switch"
        self.token_file = self.root / "cluster-token"
        # Ray's socket paths must fit 107 bytes: node temp folders live under a short root.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def laptop(self) -> Host:
        return self.hosts["laptop"]

    @property
    def workers(self) -> list[Host]:
        return [host for name, host in self.hosts.items() if name.startswith("worker")]

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_ADDRESS}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HEAD_ADDRESS}:{DASHBOARD_PORT}"

    def start(self, timeout: float = 120) -> HostCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_stale()
        self._network()
        self._token()
        self._start_node(self.head, head=True, cpus=self.head_cpus, resources=self.head_resources)
        now = [h.name for h, spec in zip(self.workers, self.workers_spec) if not spec.get("later")]
        for name in now:
            self.start_later(name)
        self.wait_for_nodes(1 + len(now), timeout)
        return self

    def start_later(self, name: str) -> None:
        """Start worker `name`'s node (not waited for: it joins within seconds)."""
        host = self.hosts[name]
        spec = self.workers_spec[self.workers.index(host)]
        self._start_node(
            host, head=False, cpus=spec["num_cpus"], resources=spec.get("resources", {})
        )

    def _namespace(self, name: str) -> str:
        namespace = f"{self.prefix}-{name}"
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _host(self, name: str, namespace: str, address: str) -> Host:
        home = self.root / name
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            HOME=str(home),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
        )
        host = Host(name, namespace, address, home, env)
        self.hosts[name] = host
        return host

    def _network(self) -> None:
        self._namespace("switch")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        names = ["head"] + [f"worker{k}" for k in range(1, len(self.workers_spec) + 1)]
        for index, name in enumerate(names, start=1):
            namespace = self._namespace(name)
            port = f"port{index}"
            _ip(
                "-n",
                namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            address = f"198.18.0.{index}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            self._host(name, namespace, address)
        laptop = self._namespace("laptop")
        head = self.head.namespace
        _ip(
            "-n",
            laptop,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "laptop0",
            "netns",
            head,
        )
        _ip("-n", head, "addr", "add", f"{HEAD_LAPTOP_ADDRESS}/24", "dev", "laptop0")
        _ip("-n", head, "link", "set", "laptop0", "up")
        _ip("-n", laptop, "addr", "add", f"{LAPTOP_ADDRESS}/24", "dev", "eth0")
        _ip("-n", laptop, "link", "set", "eth0", "up")
        _ip("-n", laptop, "route", "add", "198.18.0.0/24", "via", HEAD_LAPTOP_ADDRESS)
        self._host("laptop", laptop, LAPTOP_ADDRESS)

    def _token(self) -> None:
        """The operator's step on the head (`ray get-auth-token --generate`), then the
        token in a 0600 file every host names."""
        env = {k: v for k, v in self.head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        generated = subprocess.run(
            self.head.command(["ray", "get-auth-token", "--generate"]),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if generated.returncode != 0:
            raise RuntimeError(f"ray get-auth-token: {generated.stderr[-2000:]}")
        token = (self.head.home / ".ray" / "auth_token").read_text().strip()
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")

    def _start_node(self, host: Host, head: bool, cpus: float, resources: dict) -> None:
        temp_dir = self.ray_tmp / host.name
        argv = [
            "ray",
            "start",
            f"--node-ip-address={host.address}",
            f"--num-cpus={cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            "--disable-usage-stats",
            "--block",
        ]
        if head:
            argv += [
                "--head",
                f"--port={GCS_PORT}",
                f"--dashboard-host={HEAD_ADDRESS}",
                f"--dashboard-port={DASHBOARD_PORT}",
            ]
        else:
            argv += [f"--address={self.gcs_address}"]
        host.node = host.popen(
            argv, self.root / f"{host.name}.log", own_pids=True, env=self.node_env
        )

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def driver_env(self, host: Host) -> dict[str, str]:
        """What a driver on `host` needs to join: Ray cannot find its own address in a
        namespace."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_NODE_IP_ADDRESS": host.address}

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Until the head counts `count` live nodes (a driver on the head asks it)."""
        script = (
            "import sys, time, ray\n"
            "ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level='ERROR')\n"
            "deadline = time.monotonic() + float(sys.argv[4])\n"
            "while time.monotonic() < deadline:\n"
            "    alive = sum(node['Alive'] for node in ray.nodes())\n"
            "    if alive == int(sys.argv[3]): sys.exit(0)\n"
            "    time.sleep(0.5)\n"
            "sys.exit(f'{alive} nodes alive, not {sys.argv[3]}')\n"
        )
        deadline = time.monotonic() + timeout
        while True:
            for host in [self.head, *self.workers]:
                if host.node is not None and host.node.poll() is not None:
                    raise RuntimeError(f"{host.name}'s ray start exited:\n{self.log(host.name)}")
            done = self.head.run(
                [
                    sys.executable,
                    "-c",
                    script,
                    self.gcs_address,
                    HEAD_ADDRESS,
                    str(count),
                    str(timeout),
                ],
                timeout=timeout + 60,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster did not reach {count} nodes: {done.stderr[-2000:]}\n{self.log('head')}"
                )
            time.sleep(1)  # the head's GCS is not listening yet

    def actors_by_host(self, class_name: str, alive_only: bool = True) -> list[str]:
        """The host of each live actor of `class_name` (with `alive_only` False, also of
        those that have ended: a short run can end before the laptop's listing answers;
        never of one not placed yet, which has no node),
        asked from the laptop through the head's dashboard (Ray's state API, with the
        token)."""
        script = (
            "import json, sys\n"
            "from ray.util.state import list_actors, list_nodes\n"
            "ips = {n.node_id: n.node_ip for n in list_nodes(address=sys.argv[1])}\n"
            "alive = [('state', '=', 'ALIVE')] if sys.argv[3] == '1' else []\n"
            "actors = list_actors(address=sys.argv[1], filters=alive, limit=1000)\n"
            "print(json.dumps([ips.get(a.node_id) for a in actors\n"
            "                  if a.class_name.endswith(sys.argv[2]) and a.node_id]))\n"
        )
        done = self.laptop.run(
            [sys.executable, "-c", script, self.dashboard_url, class_name, str(int(alive_only))],
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"listing actors: {done.stderr[-2000:]}")
        by_address = {host.address: name for name, host in self.hosts.items()}
        return sorted(
            by_address.get(ip, str(ip)) for ip in json.loads(done.stdout.splitlines()[-1])
        )

    def kill(self, name: str) -> None:
        """The host vanishes: its cable is pulled, then every process it ran is killed."""
        host = self.hosts[name]
        with contextlib.suppress(RuntimeError):
            _ip("-n", host.namespace, "link", "set", "eth0", "down")
        self._kill_processes(host)

    def _kill_processes(self, host: Host) -> None:
        if host.node is not None and host.node.poll() is None:
            os.killpg(host.node.pid, signal.SIGKILL)  # PID 1 of its namespace: all go
            host.node.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (left := host.pids()) and time.monotonic() < deadline:
            for pid in left:  # in this namespace only: started by this cluster
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        if host.pids():
            raise RuntimeError(f"processes left in {host.namespace}: {host.pids()}")

    def close(self) -> None:
        errors = []
        try:
            for host in self.hosts.values():
                try:
                    self._kill_processes(host)
                except Exception as error:  # noqa: BLE001 - remove the rest, then say so
                    errors.append(error)
        finally:
            for namespace in reversed(self.namespaces):
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def host_cluster(root: Path, workers: list[dict], **kwargs) -> Iterator[HostCluster]:
    """A started `HostCluster`, torn down when the block ends, also on failure."""
    cluster = HostCluster(root, workers, **kwargs)
    # SIGTERM (a timeout, a CI runner stopping) ends the block like an error does, so the
    # teardown runs; Python's default would exit without it.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield cluster.start()
    finally:
        try:
            cluster.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
