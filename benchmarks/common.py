"""What the benchmarks share: logging to stderr, the JSON last line, the processes under
a command, a run of one measurement in a child process, the HTTP load generator, and the
plain FastAPI + uvicorn peer that serves the same predictors. Each script imports it as
`common` (a script's own folder is on its import path)."""

# No `from __future__ import annotations`: FastAPI must see the peer's request model.
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.parse

import numpy as np

from rayline.testing.processes import descendants

MOVIELENS_SMALL = os.environ.get(
    "RAYLINE_MOVIELENS",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "data",
        "movielens",
        "ml-latest-small",
    ),
)
"""MovieLens ml-latest-small (ratings.csv), which the recommender benchmarks need and the
repository does not ship (its licence): unzip grouplens.org's ml-latest-small.zip into
data/movielens/ (ignored by git), or name the folder in $RAYLINE_MOVIELENS."""

USERS = range(0, 610, 7)
"""A recommender route's `{user}` cycles over these users."""


def log(message: str) -> None:
    """Progress for the person watching: stderr, so stdout ends with the JSON alone."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(result: dict) -> None:
    """The benchmark's figures: one JSON object, the last line of stdout. Whatever is
    printed after it (Ray forwards its workers' last lines at shutdown) goes to stderr."""
    print(json.dumps(result), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def stop(proc: subprocess.Popen, signal_number: int, timeout_s: float) -> None:
    """Ask a child process to stop as a person would (SIGINT, SIGTERM), killed past the
    timeout."""
    proc.send_signal(signal_number)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children_of(root: int) -> list[int]:
    """`root` and every process below it."""
    return [root, *descendants(root)]


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU seconds so far (OSError once it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_json(argv: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run a child process (one measurement, alone in its process) and return the JSON
    object its last stdout line holds; a failure raises with the end of its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[1:3])} failed (exit {done.returncode}): {done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def http_request(
    url: str, method: str, body: dict | bytes | None = None, headers: dict | None = None
) -> bytes:
    """One raw HTTP/1.1 request for `url` (a keep-alive connection's next request): a
    JSON body, or raw bytes sent as they are."""
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.unquote(parts.path) + (f"?{parts.query}" if parts.query else "")
    raw = isinstance(body, bytes)
    payload = body if raw else json.dumps(body).encode() if body is not None else b""
    head = f"{method} {target} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
    if body is not None:
        kind = "application/octet-stream" if raw else "application/json"
        head += f"Content-Type: {kind}\r\nContent-Length: {len(payload)}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return (head + "\r\n").encode() + payload


async def read_answer(reader: asyncio.StreamReader) -> int:
    """The next whole answer on the connection: its status (the body read and dropped)."""
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        await reader.readexactly(length)
        return status
    while (size := int((await reader.readline()).strip(), 16)) > 0:
        await reader.readexactly(size + 2)
    await reader.readline()
    return status


async def drive(
    url: str,
    method: str,
    body: dict | bytes | None,
    concurrency: int,
    seconds: float,
    max_requests: int,
    users=USERS,
    headers: dict | None = None,
) -> dict:
    """`concurrency` keep-alive connections, each sending its next request as soon as the
    last is answered. Raw HTTP/1.1 over asyncio streams: an HTTP client library costs
    several times more CPU per request, and on 2 cores that CPU is the servers'."""
    parts = urllib.parse.urlsplit(url)
    # A `{user}` in the path cycles over `users`, so answers are not one user's, cached.
    requests = [
        http_request(urllib.parse.unquote(url).replace("{user}", str(user)), method, body, headers)
        for user in (users if "{user}" in urllib.parse.unquote(url) else [None])
    ]
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                started = time.perf_counter()
                try:
                    writer.write(requests[sent % len(requests)])
                    ok = await read_answer(reader) == 200
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                latencies.append(time.perf_counter() - started)
                errors += not ok
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors,
    }


def wait_ready(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


def wait_front_ready(url: str, replicas: int, timeout_s: float = 120) -> None:
    """Until the front answers and lists `replicas` replicas (not Serve's proxy)."""
    from ray import serve

    wait_ready(f"{url}/healthz", timeout_s)
    front = serve.get_deployment_handle("Front", "rayline")
    deadline = time.monotonic() + timeout_s
    while len(front.addresses.remote().result()) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the front did not list {replicas} replicas in {timeout_s}s")
        time.sleep(0.5)


def plain_fastapi(store: str, port: int, policy: str | None = None, recommender: str | None = None):
    """The peer: FastAPI + uvicorn in one process around the same predictor classes,
    answering POST /dqn/{policy}/act and GET /recommend/{user_id} for the models named."""
    import torch
    import uvicorn
    from fastapi import FastAPI, HTTPException

    from rayline.recsys.predictor import RecommenderService
    from rayline.rl.predictor import DQNPolicy
    from rayline.rl.routes import ActRequest
    from rayline.serving.base import BadInput
    from rayline.store import ModelRegistry

    torch.set_num_threads(1)
    registry = ModelRegistry(store, create=False)
    app = FastAPI()
    if policy:
        served_policy = DQNPolicy(registry, policy)

        @app.post(f"/dqn/{policy}/act")
        def act(body: ActRequest) -> dict:
            try:
                return served_policy.act(served_policy.check(body.observations))
            except BadInput as exc:
                raise HTTPException(400, str(exc)) from None

    if recommender:
        served_recommender = RecommenderService(registry, recommender)

        @app.get("/recommend/{user_id}")
        def recommend(user_id: str, k: int = 10) -> dict:
            return served_recommender.recommend(user_id, k)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
