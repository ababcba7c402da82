"""rayline's front (HAProxy) on its own, before plain HTTP servers: a reload for a new set
of replicas keeps the clients' keep-alive connections, and a replica that dies with a
request in hand has that request answered by another."""

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rayline.serving.front import (
    NO_REPLICA,
    HAProxy,
    haproxy_config,
    remove_stale_directories,
    wait_listening,
)
from rayline.serving.replays import REQUEST_ID_HEADER, request_name


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the replicas answer

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()

    def log_message(self, *args):
        pass


def ask(conn: socket.socket, reader) -> int | None:
    """GET / on the open connection: its status, None when the connection was closed."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")
    return read_status(reader)


def read_head(reader) -> tuple[bytes, int]:
    """A message's first line and its Content-Length (b"" and 0 at end of stream)."""
    first = reader.readline()
    length = 0
    while first and (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return first, length


def read_status(reader) -> int | None:
    """A whole response's status, None when the connection was closed unanswered."""
    status, length = read_head(reader)
    if not status:
        return None
    reader.read(length)
    return int(status.split()[1])


class Replica(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # HAProxy's health checks hang up without a request


@contextlib.contextmanager
def started_front(directory, servers, request_deadline_s: float = 10.0, backup=None):
    """An HAProxy with the front's configuration for `servers` on a free loopback port:
    (the HAProxy, its port), stopped on exit."""
    (directory / "503.http").write_text(NO_REPLICA)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = HAProxy(str(directory))
    try:
        config = haproxy_config(
            "127.0.0.1", port, servers, backup, str(directory), 5, request_deadline_s
        )
        assert f"timeout http-request {round(request_deadline_s * 1000)}ms" in config
        proxy.apply(config)
        wait_listening("127.0.0.1", port, 10, proxy.running)
        yield proxy, port
    finally:
        proxy.stop()


@pytest.fixture
def replicas():
    servers = [Replica(("127.0.0.1", 0), Answer) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [server.server_address for server in servers]
    for server in servers:
        server.shutdown()


def test_a_reload_answers_the_next_request_on_an_idle_keep_alive_connection(tmp_path, replicas):
    (tmp_path / "503.http").write_text(NO_REPLICA)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = HAProxy(str(tmp_path))

    def config(servers) -> str:
        return haproxy_config("127.0.0.1", port, servers, None, str(tmp_path), 5)

    try:
        proxy.apply(config(replicas[:1]))
        wait_listening("127.0.0.1", port, 10, proxy.running)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            reader = conn.makefile("rb")
            assert ask(conn, reader) == 200
            proxy.apply(config(replicas))  # a second replica: HAProxy reloads
            time.sleep(1.0)  # the old worker is soft-stopping by now, this connection idle
            # Before `option idle-close-on-response` the old worker closed it here, and a
            # request sent as it closed was lost (benchmarks/soak.py counted them).
            assert ask(conn, reader) == 200
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert ask(conn, conn.makefile("rb")) == 200  # the new worker answers
    finally:
        proxy.stop()


class DyingReplica:
    """Answers health checks, then dies like a killed process on its first POST: it reads
    the request, and closes that connection and its listening socket unanswered."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.posts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                reader = conn.makefile("rb")
                request, length = read_head(reader)
                if request.startswith(b"POST"):
                    reader.read(length)
                    self.posts += 1
                    self.listener.close()
                    return
                if request:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )


def post_in_two_writes(conn: socket.socket, reader) -> int | None:
    """POST with its body a moment after its headers (as clients often send it): the
    status, None when the connection was closed unanswered."""
    body = b'{"observations": [0, 0, 0, 0]}'
    conn.sendall(
        b"POST /act HTTP/1.1\r\nHost: front\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    time.sleep(0.05)
    conn.sendall(body)
    return read_status(reader)


def test_a_request_whose_replica_dies_under_it_is_answered_by_another(tmp_path, replicas):
    """Before `option http-buffer-request` such a request was not retryable (HAProxy
    retries only a request it holds whole): the client got a 502, or on a keep-alive
    connection the front hung up without an answer."""
    dying = DyingReplica()
    with started_front(tmp_path, [dying.address, replicas[0]]) as (_, port):
        statuses = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            reader = conn.makefile("rb")
            for _ in range(6):  # least connections sends one of the first to the dying one
                statuses.append(post_in_two_writes(conn, reader))
        assert dying.posts == 1
        assert statuses == [200] * 6, statuses


def test_the_directories_of_dead_fronts_are_removed_and_the_others_kept(tmp_path, replicas):
    """A killed front runs no clean-up: the next one removes what it left."""
    live, dead, starting, abandoned, other = (
        tmp_path / name
        for name in (
            "rayline-front-live",
            "rayline-front-dead",
            "rayline-front-starting",
            "rayline-front-abandoned",
            "something-else",
        )
    )
    for directory in (live, dead, starting, abandoned, other):
        directory.mkdir()
    with started_front(live, replicas):
        exited = subprocess.Popen(["true"])
        exited.wait()
        (dead / "haproxy.pid").write_text(f"{exited.pid}\n")
        two_hours_ago = time.time() - 7200
        os.utime(abandoned, (two_hours_ago, two_hours_ago))
        removed = remove_stale_directories(str(tmp_path))
        assert sorted(removed) == sorted([str(dead), str(abandoned)])
        assert live.exists() and starting.exists() and other.exists()
        assert (live / "haproxy.pid").exists()  # kept because its HAProxy runs


def test_with_no_replica_up_the_front_answers_503_and_keeps_the_connection(tmp_path):
    """A whole answer with its length and Retry-After: a client in a retry loop keeps its
    connection, and never reads the body as the next answer."""
    with started_front(tmp_path, []) as (_, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            reader = conn.makefile("rb")
            assert [post_in_two_writes(conn, reader) for _ in range(3)] == [503] * 3
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /x HTTP/1.1\r\nHost: front\r\n\r\n")
            head = conn.makefile("rb").read(len(NO_REPLICA))
            assert b"retry-after: 1\r\n" in head.lower()
            assert head.endswith(b'{"detail": "no replica is up; retry shortly"}\n')


def test_a_slow_client_is_cut_off_at_the_request_deadline(tmp_path, replicas):
    """A client that sends its request a byte every 0.25 s (never idle long enough for
    any idle timeout) gets 408 and a closed connection once the whole request is not in
    by the deadline; a prompt client beside it is answered meanwhile."""
    import select

    with started_front(tmp_path, replicas, request_deadline_s=2.0) as (_, port):
        request = b"POST /x HTTP/1.1\r\nHost: front\r\nContent-Length: 200\r\n\r\n" + b"x" * 200
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            started, answer = time.monotonic(), b""
            for i, byte in enumerate(request):
                if select.select([slow], [], [], 0)[0]:  # the front answered: it gave up
                    answer = slow.recv(1 << 16)
                    break
                slow.sendall(bytes([byte]))
                if i == 4:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as prompt:
                        assert post_in_two_writes(prompt, prompt.makefile("rb")) == 200
                time.sleep(0.25)
            cut = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert 1.5 < cut < 5, cut
            assert slow.recv(1 << 16) == b""  # and closed


class Loading(Answer):
    def do_GET(self):  # noqa: N802
        body = b'{"status": "loading"}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_new_replica_joins_the_table_once_it_says_it_is_ready(replicas):
    """Listed by the controller but not listening yet, or answering /readyz 503 while
    it loads its models: kept out. Ready, or already in the table (HAProxy's checks
    watch those): in."""
    from rayline.serving.front import Replica as Known
    from rayline.serving.front import table

    loading = Replica(("127.0.0.1", 0), Loading)
    threading.Thread(target=loading.serve_forever, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()  # nothing listens there once the probe is closed
    try:
        ready = Known(*replicas[0], "replica-a")
        starting = Known(*loading.server_address, "replica-b")
        gone = Known(*closed, "replica-c")
        listed = [ready, starting, gone]
        assert table(listed, held=[]) == [ready]
        assert table(listed, held=[starting]) == [ready, starting]
        # A new replica on its dead predecessor's port is new: asked again.
        reborn = Known(*loading.server_address, "replica-d")
        assert table([reborn], held=[starting]) == []
    finally:
        loading.shutdown()


class Counted(http.server.BaseHTTPRequestHandler):
    """A replica whose POSTs answer `status` (its server's), counted; its /readyz answers
    its server's `ready` (200 or 503), as a saturated gateway replica does."""

    protocol_version = "HTTP/1.1"

    def answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_GET(self):  # noqa: N802
        self.answer(self.server.ready if self.path == "/readyz" else 200)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        # `status` may be a list: one status per POST, the last one for the rest.
        statuses = self.server.status
        if isinstance(statuses, list):
            self.answer(statuses.pop(0) if len(statuses) > 1 else statuses[0])
        else:
            self.answer(statuses)

    def log_message(self, *args):
        pass


def counted_replica(status: int = 200, ready: int = 200) -> Replica:
    server = Replica(("127.0.0.1", 0), Counted)
    server.status, server.ready, server.posts = status, ready, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_request_a_replica_answered_with_an_error_is_not_replayed(tmp_path):
    """A request that meets a bug (500) or its timeout (504) in one replica would meet it
    in the next: answered once, by the replica that met it, the other never asked."""
    for status in (500, 504):
        failing, other = counted_replica(status), counted_replica()
        try:
            directory = tmp_path / str(status)
            directory.mkdir()
            servers = [failing.server_address, other.server_address]
            with (
                started_front(directory, servers) as (_, port),
                socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
            ):
                reader = conn.makefile("rb")
                answered = [post_in_two_writes(conn, reader) for _ in range(4)]
            assert answered.count(status) == failing.posts, (status, answered)
            assert failing.posts >= 1 and other.posts == answered.count(200)
        finally:
            failing.shutdown()
            other.shutdown()


def test_a_replica_that_says_it_cannot_take_work_gets_none_until_it_can(tmp_path):
    saturated, free = counted_replica(ready=503), counted_replica()
    try:
        servers = [saturated.server_address, free.server_address]
        with started_front(tmp_path, servers) as (_, port):
            time.sleep(1.5)  # a health check of each
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                reader = conn.makefile("rb")
                assert [post_in_two_writes(conn, reader) for _ in range(6)] == [200] * 6
            assert (saturated.posts, free.posts) == (0, 6)
            saturated.ready = 200
            time.sleep(1.5)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                reader = conn.makefile("rb")
                assert [post_in_two_writes(conn, reader) for _ in range(6)] == [200] * 6
            assert saturated.posts >= 1
    finally:
        saturated.shutdown()
        free.shutdown()


def test_serve_proxy_as_the_backup_is_retried_on_a_500(tmp_path):
    """With no replica up the front answers through Serve's proxy, which says 500 when
    the replica it picked dies under the request (RayActorError): that request is tried
    again there (a replica's own 500 is not: above)."""
    proxy = counted_replica(status=[500, 500, 200])
    try:
        with (
            started_front(tmp_path, [], backup=proxy.server_address) as (_, port),
            socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
        ):
            time.sleep(1.5)  # the proxy's first health check
            assert post_in_two_writes(conn, conn.makefile("rb")) == 200
        assert proxy.posts == 3
    finally:
        proxy.shutdown()


class Named(Answer):
    """Answers 200, keeping the name the front gave each request."""

    def do_POST(self):  # noqa: N802
        self.server.names.append(self.headers.get_all(REQUEST_ID_HEADER))
        super().do_POST()


def test_the_front_names_each_request_and_a_clients_own_name_is_replaced(tmp_path):
    server = Replica(("127.0.0.1", 0), Named)
    server.names = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with (
            started_front(tmp_path, [server.server_address]) as (_, port),
            socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
        ):
            reader = conn.makefile("rb")
            for given in (b"", b"X-Rayline-Request: 00000000-0000-4000-8000-000000000000\r\n"):
                conn.sendall(
                    b"POST /act HTTP/1.1\r\nHost: front\r\nContent-Length: 2\r\n"
                    + given
                    + b"\r\n{}"
                )
                assert read_status(reader) == 200
    finally:
        server.shutdown()
    (first,), (second,) = server.names
    assert first != second
    for name in (first, second):
        assert request_name(name.encode()) is not None, name
        assert name != "00000000-0000-4000-8000-000000000000"


def held_replicas(directory, count: int = 2) -> list[tuple[subprocess.Popen, int]]:
    """`count` stand-in gateway replicas (tests/held_replica.py) sharing the table in
    `directory`: (process, port) each, once listening."""
    started = []
    for i in range(count):
        ready = directory / f"ready-{i}"
        script = os.path.join(os.path.dirname(__file__), "held_replica.py")
        proc = subprocess.Popen([sys.executable, script, str(directory), str(ready)])
        started.append((proc, ready))
    out = []
    for proc, ready in started:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "replica did not start"
            time.sleep(0.05)
        out.append((proc, int(ready.read_text())))
    return out


def post_and_kill_its_holder(port: int, directory, how: signal.Signals):
    """A POST through the front; its replica killed by `how` while it holds it: (status,
    body, pid killed)."""
    answer: list = []

    def post() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"POST /act HTTP/1.1\r\nHost: front\r\nContent-Length: 2\r\n\r\n{}")
            reader = conn.makefile("rb")
            status, length = read_head(reader)
            answer.extend([int(status.split()[1]), reader.read(length).decode()])

    client = threading.Thread(target=post)
    client.start()
    deadline = time.monotonic() + 10
    while not (markers := list(directory.glob("holding-*"))):
        assert time.monotonic() < deadline, "no replica took the request"
        time.sleep(0.01)
    (marker,) = markers
    pid = int(marker.name.removeprefix("holding-"))
    marker.unlink()
    os.kill(pid, how)
    client.join(timeout=30)
    return answer[0], answer[1], pid


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_request_whose_replica_crashed_of_a_fault_is_not_replayed(tmp_path, how):
    """Killed from outside (SIGKILL), the replica's request is answered by the other;
    dead of a fault (SIGSEGV: the request may have caused it), the other answers 502 and
    computes nothing, so one poison request cannot take every replica down in turn."""
    table = tmp_path / "table"
    replicas = held_replicas(table)
    try:
        servers = [("127.0.0.1", port) for _, port in replicas]
        with started_front(tmp_path, servers) as (_, port):
            status, body, killed = post_and_kill_its_holder(port, table, how)
        (other,) = [proc for proc, _ in replicas if proc.pid != killed]
        assert other.poll() is None  # the other replica lives
        fault = (table / f"fault-{killed}").read_text()
        if how == signal.SIGKILL:
            assert (status, json.loads(body)) == (200, {"pid": other.pid})
            assert fault == ""
        else:
            assert status == 502, body
            assert f"crashed (process {killed})" in body and "not replayed" in body
            assert "Segmentation fault" in fault
            assert (table / f"fault-{killed}.logged").exists()  # its traceback logged once
            assert not list(table.glob("holding-*"))  # the other never computed it
    finally:
        for proc, _ in replicas:
            proc.kill()
            proc.wait()
