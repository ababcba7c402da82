"""rayline's front (HAProxy) on its own, before two plain HTTP servers: a reload for a new
set of replicas keeps the clients' keep-alive connections."""

import http.server
import socket
import threading
import time

import pytest

from rayline.serving.front import NO_REPLICA, HAProxy, haproxy_config, wait_listening


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the replicas answer

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def ask(conn: socket.socket, reader) -> int | None:
    """GET / on the open connection: its status, None when the connection was closed."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: front\r\n\r\n")
    status = reader.readline()
    if not status:
        return None
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    reader.read(length)
    return int(status.split()[1])


class Replica(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # HAProxy's health checks hang up without a request


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
