"""A legitimate mixed load beside a hostile one, against `rayline serve` as a user runs it
(the front, 2 gateway replicas, every kind of model).

    .venv/bin/python benchmarks/hostile.py [--seconds 60] [--replicas 2]

The legitimate load: DQN `/act`, XGBoost `/predict`, a classifier's `/classify` and the
recommender's `GET /recommend` (one request each of the first three to ten of the
last). First at full speed for 15 s, in turn on each of 8 keep-alive connections (each
connection's next request as soon as the last is answered: the replicas' capacity for
the mix); then at --load of that rate (0.5: traffic the service was sized for, with
headroom; at full speed any extra load, hostile or not, slows every request by the share
of the CPU it takes), each request sent when it is due on a free keep-alive connection
(`connections`: how many were opened), alone for --seconds, then for --seconds beside
the hostile load (a paced request's latency counts from when it was due, so a stalled
server is not hidden by requests it delayed; `p99_answer_ms` from when it was sent). The
hostile load, in turn on each of 6 connections:
- expensive requests within every limit: a 4096 x 4096 image to classify, 60 images of
  512 x 512, a 1024 x 1024 image to segment, 10,000 XGBoost rows, a new user's 10,000
  ratings, 1,024 observations;
- requests over a limit: an image whose header promises 20,000 x 20,000 pixels, a
  1 x 2,000 one, a 1,025 x 1,024 one to segment, 1,025 observations, observations past
  float32's range, 10,001 rows, a 2 MiB body;
- slow clients: connections that send a request's headers a byte every 0.5 s.
Every gateway replica's resident memory, its child processes' included, is sampled every
0.2 s (idle: before any load). `loop_lag`: each gateway replica's event-loop lag probes
(rayline_event_loop_lag_ms, one every 0.1 s) in each phase, read from Ray's metrics
export: how many, how many woke over 50 ms late, the histogram bucket holding their 99th
percentile. The loop answers every request of its replica: a p99 that rises while the
loops stay on time waits somewhere else (the front, the models' threads, the client).
Last stdout line:
{"legitimate": {"full_speed": {"requests", "success_rate", "failed_by", "p50_ms",
                               "p99_ms", "p99_answer_ms", "p99_ms_by_route"},
                "rps", "alone": {..., "connections", "client_loop_lag_ms": {"p99", "max"}},
                "beside_hostile": {...},
                "p99_ratio"},
 "hostile": {"<request>": {"<status>": count}}, "hostile_5xx_other_than_503": int,
 "loop_lag": {"alone": {REPLICA: {"probes", "over_50ms", "p99_ms_at_most"}},
              "beside_hostile": {...}},
 "replicas": [{"pid", "idle_mb", "peak_mb", "growth_mb"}], "replica_deaths": int,
 "targets": {"legitimate_success", "p99_ratio", "replica_deaths", "memory_growth_mb",
             "hostile_5xx"}}
(each target true when met: success >= 99.9 %, p99 <= 2x alone, no death, every replica
within 512 MB of idle, no hostile 5xx but 503).
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import emit, free_port, http_request, log, read_answer, stop, wait_ready

LEGITIMATE_CONNECTIONS = 8
HOSTILE_CONNECTIONS = 6
SLOW_CLIENTS = 16
IDLE_CONNECTION_S = 5.0


def png(width: int, height: int, noise: bool = False) -> str:
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def make_store(path: str) -> None:
    """Every served kind, small: a CartPole-sized DQN policy, a 3-feature XGBoost model,
    an untrained 3-class mobilenet_v3_small on 32-pixel images, an untrained resnet18
    FCN-32s and a user-kNN recommender, each promoted."""
    import torch

    from rayline.boosting.data import Table, infer_task
    from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
    from rayline.recsys.data import synthetic_ratings
    from rayline.recsys.knn import UserKNN
    from rayline.rl.networks import NetworkSpec, build_q_network
    from rayline.store import ModelRegistry
    from rayline.vision import fcn, transfer

    def saved(module) -> bytes:
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.getvalue()

    registry = ModelRegistry(path)
    torch.manual_seed(0)
    spec = NetworkSpec([4], 2, [64, 64], dueling=False)
    files = {"policy.pt": saved(build_q_network(spec)), "network.json": json.dumps(spec.__dict__)}
    registry.register(
        "policy",
        {k: v if isinstance(v, bytes) else v.encode() for k, v in files.items()},
        kind="dqn",
    )
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 3)).astype(np.float32)
    label = (features[:, 2] + 0.3 * features[:, 0] > 0).astype(np.int64)
    table = Table(features, label, ["a", "b", "c"], ["q", "q", "q"], {})
    train, valid = table.subset(np.arange(240)), table.subset(np.arange(240, 300))
    task = infer_task(train.label)
    params = booster_params(TreeParams(max_depth=3), task, threads=1, seed=0)
    booster = fit(
        params, task, train.dmatrix(), valid.dmatrix(), rounds=20, tracker=BestRound(task, 0)
    )
    registry.register("risk", booster.files(), kind="xgboost")
    classes = ["circle", "square", "triangle"]
    model, _ = transfer.build_model("mobilenet_v3_small", len(classes), "none")
    meta = {"arch": "mobilenet_v3_small", "classes": classes, "crop_size": 32, "resize_size": 32}
    registry.register(
        "shapes",
        {"best.pt": saved(model), "model.json": json.dumps(meta).encode()},
        kind="image_classifier",
    )
    meta = {"arch": "resnet18", "variant": "fcn32s", "classes": ["background", *classes[:2]]}
    registry.register(
        "scenes",
        {
            "best.pt": saved(fcn.FCN("resnet18", 3, "fcn32s")),
            "model.json": json.dumps(meta).encode(),
        },
        kind="segmenter",
    )
    data, _ = synthetic_ratings(610, 2000, density=0.05, seed=0)
    registry.register(
        "movies", UserKNN(similarity="cosine", k=50).fit(data).save(), kind="recommender"
    )
    for name in ("policy", "risk", "shapes", "scenes", "movies"):
        registry.promote(name, 1)


def legitimate_requests(base: str) -> list[tuple[str, bytes]]:
    return [
        ("dqn", http_request(f"{base}/dqn/policy/act", "POST", {"observations": [0.1, 0, 0.2, 0]})),
        (
            "xgboost",
            http_request(
                f"{base}/xgboost/risk/predict",
                "POST",
                {"rows": [{"a": 0.5, "b": 1, "c": -0.3}] * 4},
            ),
        ),
        (
            "classify",
            http_request(f"{base}/vision/shapes/classify", "POST", {"images": [png(48, 40)]}),
        ),
        *(
            ("recommend", http_request(f"{base}/recommend/{user}?k=10", "GET"))
            for user in range(0, 610, 61)
        ),
    ]


def hostile_requests(base: str) -> list[tuple[str, bytes]]:
    def post(label: str, path: str, body: dict) -> tuple[str, bytes]:
        return label, http_request(base + path, "POST", body)

    from PIL import Image

    def header_only(width: int, height: int) -> str:
        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
        return base64.b64encode(buffer.getvalue()).decode()

    row = {"a": 0.5, "b": 1.0, "c": -0.3}
    return [
        post("classify_4096x4096", "/vision/shapes/classify", {"images": [png(4096, 4096)]}),
        post("classify_60x512x512", "/vision/shapes/classify", {"images": [png(512, 512)] * 60}),
        post("segment_1024x1024", "/vision/scenes/segment", {"images": [png(1024, 1024)]}),
        post("xgboost_10000_rows", "/xgboost/risk/predict", {"rows": [row] * 10_000}),
        post(
            "recommend_10000_ratings",
            "/recommend",
            {"ratings": {str(i): 4.0 for i in range(10_000)}},
        ),
        post(
            "dqn_1024_observations", "/dqn/policy/act", {"observations": [[0.1, 0, 0.2, 0]] * 1024}
        ),
        post(
            "bomb_20000x20000", "/vision/shapes/classify", {"images": [header_only(20_000, 20_000)]}
        ),
        post("thin_1x2000", "/vision/shapes/classify", {"images": [png(1, 2000)]}),
        post("segment_1025x1024", "/vision/scenes/segment", {"images": [header_only(1025, 1024)]}),
        post(
            "dqn_1025_observations", "/dqn/policy/act", {"observations": [[0.1, 0, 0.2, 0]] * 1025}
        ),
        post("dqn_past_float32", "/dqn/policy/act", {"observations": [[1e39, 0, 0, 0]] * 1024}),
        post("xgboost_10001_rows", "/xgboost/risk/predict", {"rows": [row] * 10_001}),
        post("body_2MiB", "/dqn/policy/act", {"observations": [[0.1] * 4] * 50_000}),
    ]


async def cycle(port: int, requests: list, seconds: float, offset: int, record) -> None:
    """One keep-alive connection sending `requests` in turn, from `offset`, for
    `seconds`, the next as soon as the last is answered. `record(label, status or None,
    seconds, seconds)` per answer (None: the connection was cut)."""
    deadline = time.perf_counter() + seconds
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < deadline:
            label, raw = requests[i % len(requests)]
            i += 1
            sent = time.perf_counter()
            try:
                writer.write(raw)
                status = await read_answer(reader)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                status = None
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            taken = time.perf_counter() - sent
            record(label, status, taken, taken)
    finally:
        writer.close()


async def slow_client(port: int, seconds: float, record) -> None:
    """Sends a request's headers a byte every 0.5 s until the front cuts it off."""
    deadline = time.perf_counter() + seconds
    raw = http_request(
        f"http://127.0.0.1:{port}/dqn/policy/act", "POST", {"observations": [0, 0, 0, 0]}
    )
    while time.perf_counter() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for byte in raw:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.5)
                if reader.at_eof() or time.perf_counter() > deadline:
                    break
            line = await asyncio.wait_for(reader.readline(), 1.0)
            record("slow_client", int(line.split()[1]) if line else None, 0.0, 0.0)
        except (OSError, ValueError, IndexError, asyncio.TimeoutError):
            record("slow_client", None, 0.0, 0.0)
        finally:
            writer.close()


def replica_pids() -> dict[int, str]:
    pids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ServeReplica:rayline:Gateway" in f.read():
                        pids[int(entry)] = "gateway"
            except OSError:
                continue
    return pids


def own_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """A replica's resident memory with its child processes' (none today: what a
    replica starts counts as its own)."""
    own = own_rss_mb(pid)
    if own is None:
        return None
    children = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    return own + sum(own_rss_mb(child) or 0.0 for child in children)


async def sample_memory(peaks: dict[int, float], seen: set[int], stop_event: asyncio.Event):
    def sample() -> None:
        for pid in replica_pids():
            seen.add(pid)
            mb = rss_mb(pid)
            if mb is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), mb)

    # In a thread: reading /proc for every process takes milliseconds, which on the
    # load's own event loop would delay the requests it sends.
    while not stop_event.is_set():
        await asyncio.to_thread(sample)
        await asyncio.sleep(0.2)


async def client_lag(lateness_ms: list[float], stop_event: asyncio.Event) -> None:
    """How late this process's own event loop wakes (every 10 ms): a request the load
    generator sends late, or an answer it reads late, counts against the server."""
    while not stop_event.is_set():
        due = time.perf_counter() + 0.01
        await asyncio.sleep(0.01)
        lateness_ms.append((time.perf_counter() - due) * 1000)


LAG_PREFIX = "ray_rayline_event_loop_lag_ms_bucket{"


def loop_lag_counts(metrics_port: int) -> dict[str, dict[float, float]]:
    """Each gateway replica's event-loop lag histogram as Ray exports it now: replica ->
    {bucket's upper bound in ms: probes at or under it} (rayline.serving.metrics.LoopLag)."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if not line.startswith(LAG_PREFIX) or 'deployment="Gateway"' not in line:
            continue
        replica = re.search(r'replica="([^"]*)"', line).group(1)
        bound = re.search(r'le="([^"]*)"', line).group(1)
        counts.setdefault(replica, {})[float(bound)] = float(line.rsplit(" ", 1)[1])
    return counts


def loop_lag(before: dict, after: dict) -> dict:
    """Per replica, the probes taken between two readings: how many, how many woke over
    50 ms late, and the bucket that holds their 99th percentile (ms; inf past the last)."""
    out = {}
    for replica, buckets in after.items():
        earlier = before.get(replica, {})
        delta = {b: n - earlier.get(b, 0.0) for b, n in sorted(buckets.items())}
        probes = delta.get(float("inf"), 0.0)
        if probes <= 0:
            continue
        p99 = next(b for b, n in delta.items() if n >= 0.99 * probes)
        out[replica] = {
            "probes": int(probes),
            "over_50ms": int(probes - delta.get(50.0, 0.0)),
            "p99_ms_at_most": p99,
        }
    return out


def settled_lag_counts(metrics_port: int) -> dict[str, dict[float, float]]:
    """`loop_lag_counts` once Ray's export has caught up with the phase just ended: a
    replica hands its probes to Ray every second and Ray exports every 10 s
    (`metrics_report_interval_ms`). The idle probes of the wait land in the next phase's
    count (a few per cent of it)."""
    time.sleep(12)
    return loop_lag_counts(metrics_port)


def summary(answers: list[tuple[str, int | None, float, float]]) -> dict:
    """The legitimate answers' share of 200s and latencies, all together and per route.
    `p99_answer_ms`: from the request's sending, not from when it was due: what the
    service took once asked, without the wait for the connection's previous answer."""
    ms = np.array([seconds for _, _, seconds, _ in answers]) * 1000
    answer_ms = np.array([seconds for _, _, _, seconds in answers]) * 1000
    good = sum(status == 200 for _, status, _, _ in answers)
    routes = sorted({label for label, *_ in answers})
    return {
        "requests": len(answers),
        "success_rate": round(good / max(1, len(answers)), 5),
        "failed_by": dict(
            collections.Counter(
                f"{label} {status}" for label, status, *_ in answers if status != 200
            )
        ),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "p99_answer_ms": round(float(np.percentile(answer_ms, 99)), 2),
        "p99_ms_by_route": {
            route: round(
                float(np.percentile([1000 * t for r, _, t, _ in answers if r == route], 99)), 2
            )
            for route in routes
        },
    }


async def paced(port: int, requests: list, seconds: float, rps: float, record) -> int:
    """`requests` in turn at `rps`, each sent when it is due on a keep-alive connection
    that is free then (a new one when none is): no request waits for another's answer,
    and its latency counts from when it was due. On connections that each sent their
    next request only once the last was answered, a late classify made the DQN, XGBoost
    and recommender requests behind it late too. The connections opened."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    opened = 0

    async def send(label: str, raw: bytes, due: float) -> None:
        nonlocal opened
        # A connection idle for IDLE_CONNECTION_S is closed, as HTTP clients do before
        # the server's keep-alive timeout (the front's is 15 s) can close it under them.
        while idle and time.perf_counter() - idle[-1][2] > IDLE_CONNECTION_S:
            idle.pop()[1].close()
        if idle:
            reader, writer, _ = idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened += 1
        sent = time.perf_counter()
        try:
            writer.write(raw)
            status = await read_answer(reader)
            idle.append((reader, writer, time.perf_counter()))
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            status = None
            writer.close()
        answered = time.perf_counter()
        record(label, status, answered - min(due, sent), answered - sent)

    begun = time.perf_counter()
    sending = set()
    for i in range(int(seconds * rps)):
        due = begun + i / rps
        await asyncio.sleep(due - time.perf_counter())
        task = asyncio.ensure_future(send(*requests[i % len(requests)], due))
        sending.add(task)
        task.add_done_callback(sending.discard)
    await asyncio.gather(*sending)
    for _, writer, _ in idle:
        writer.close()
    return opened


async def phase(
    port: int, seconds: float, hostile: bool, legit_rps: float = 0.0
) -> tuple[dict, dict, dict]:
    """(the legitimate load's summary, the hostile answers by status, replica peaks).
    `legit_rps`: the legitimate load's rate (0: at full speed, 8 connections each
    sending its next request as soon as the last is answered)."""
    base = f"http://127.0.0.1:{port}"
    legit, bad = legitimate_requests(base), hostile_requests(base)
    legit_answers, answers = [], {}

    def record_legit(label, status, from_due_s, from_sent_s):
        legit_answers.append((label, status, from_due_s, from_sent_s))

    def record_hostile(label, status, from_due_s, from_sent_s):
        counts = answers.setdefault(label, {})
        counts[str(status)] = counts.get(str(status), 0) + 1

    peaks: dict[int, float] = {}
    seen: set[int] = set()
    stop_event = asyncio.Event()
    sampler = asyncio.ensure_future(sample_memory(peaks, seen, stop_event))
    lateness_ms: list[float] = []
    prober = asyncio.ensure_future(client_lag(lateness_ms, stop_event))
    if legit_rps:
        tasks = [paced(port, legit, seconds, legit_rps, record_legit)]
    else:
        tasks = [
            cycle(port, legit, seconds, i * 3, record_legit) for i in range(LEGITIMATE_CONNECTIONS)
        ]
    if hostile:
        tasks += [
            cycle(port, bad, seconds, i * 2, record_hostile) for i in range(HOSTILE_CONNECTIONS)
        ]
        tasks += [slow_client(port, seconds, record_hostile) for _ in range(SLOW_CLIENTS)]
    done = await asyncio.gather(*tasks)
    stop_event.set()
    await sampler
    await prober
    legitimate = summary(legit_answers)
    legitimate["client_loop_lag_ms"] = {
        "p99": round(float(np.percentile(lateness_ms, 99)), 2),
        "max": round(max(lateness_ms), 2),
    }
    if legit_rps:
        legitimate["connections"] = done[0]
    return legitimate, answers, {"peaks": peaks, "seen": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="each phase's length")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="the legitimate load's rate, as a share of what the replicas answered with "
        "it alone at full speed (measured first)",
    )
    args = parser.parse_args()
    port, metrics_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="hostile-") as store:
        log("registering a model of every kind ...")
        make_store(store)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLINE_API_KEY")}
        server = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "rayline"),
                "serve",
                "--store",
                store,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--replicas",
                str(args.replicas),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", timeout_s=300)
            while len(replica_pids()) < args.replicas:
                time.sleep(0.5)
            time.sleep(3)  # every replica in the front's table
            idle = {pid: rss_mb(pid) for pid in replica_pids()}
            log(f"idle replicas (MB): {idle}")
            log("the legitimate load's full speed, 15 s ...")
            full, _, _ = asyncio.run(phase(port, 15, hostile=False))
            legit_rps = round(args.load * full["requests"] / 15, 1)
            log(f"  {full}")
            log(f"legitimate load alone at {legit_rps:g} req/s, {args.seconds:g} s ...")
            lag = [settled_lag_counts(metrics_port)]
            alone, _, before = asyncio.run(phase(port, args.seconds, False, legit_rps))
            lag.append(settled_lag_counts(metrics_port))
            log(f"  {alone}")
            log(f"beside the hostile load, {args.seconds:g} s ...")
            beside, answers, memory = asyncio.run(phase(port, args.seconds, True, legit_rps))
            lag.append(settled_lag_counts(metrics_port))
            log(f"  {beside}")
            memory["seen"] |= before["seen"]
        finally:
            stop(server, signal.SIGINT, 60)
    # A replica that died was replaced by a process with another pid.
    deaths = len(memory["seen"] - set(idle))
    replicas = [
        {
            "pid": pid,
            "idle_mb": round(idle_mb, 1),
            "peak_mb": round(memory["peaks"].get(pid, idle_mb), 1),
            "growth_mb": round(memory["peaks"].get(pid, idle_mb) - idle_mb, 1),
        }
        for pid, idle_mb in idle.items()
    ]
    server_errors = sum(
        count
        for counts in answers.values()
        for status, count in counts.items()
        if status.isdigit() and int(status) >= 500 and status != "503"
    )
    p99_ratio = round(beside["p99_ms"] / alone["p99_ms"], 3)
    emit(
        {
            "legitimate": {
                "full_speed": full,
                "rps": legit_rps,
                "alone": alone,
                "beside_hostile": beside,
                "p99_ratio": p99_ratio,
            },
            "loop_lag": {"alone": loop_lag(*lag[:2]), "beside_hostile": loop_lag(*lag[1:])},
            "hostile": answers,
            "hostile_5xx_other_than_503": server_errors,
            "replicas": replicas,
            "replica_deaths": deaths,
            "targets": {
                "legitimate_success": beside["success_rate"] >= 0.999,
                "p99_ratio": p99_ratio <= 2.0,
                "replica_deaths": deaths == 0,
                "memory_growth_mb": all(r["growth_mb"] <= 512 for r in replicas),
                "hostile_5xx": server_errors == 0,
            },
        }
    )


if __name__ == "__main__":
    main()
