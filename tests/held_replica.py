"""A stand-in gateway replica for tests/test_front.py, run as a process of its own:
`python tests/held_replica.py DIRECTORY READY_FILE`. It keeps the requests it holds in
the shared table (rayline.serving.replays.HeldRequests over DIRECTORY) as a gateway
replica's guard does, answers a replay of a crashed replica's request 502, and holds each
POST for a second (writing its pid to DIRECTORY/holding-<pid>) so that a test can kill it
from outside with the request in hand. READY_FILE gets its port once it listens."""

import http.server
import os
import sys
import time

from rayline.serving.replays import REQUEST_ID_HEADER, HeldRequests, request_name


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status: int, body: bytes = b"{}") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.answer(200)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        name = request_name((self.headers.get(REQUEST_ID_HEADER) or "").encode())
        if name is None:
            return self.answer(400, b'{"detail": "no request name"}')
        refusal = held.take(name)
        if refusal is not None:
            return self.answer(502, refusal.encode())
        try:
            marker = os.path.join(directory, f"holding-{os.getpid()}")
            with open(marker, "w") as f:
                f.write(name.decode())
            time.sleep(1.0)
            self.answer(200, f'{{"pid": {os.getpid()}}}'.encode())
        finally:
            held.release(name)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    directory, ready_file = sys.argv[1], sys.argv[2]
    held = HeldRequests(directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(ready_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(ready_file + ".tmp", ready_file)
    server.serve_forever()
