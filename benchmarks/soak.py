"""Held under load for long: every process's memory and the object store sampled while
`rayline serve` answers a mixed load (serving) and while a DQN run goes on past the
point where its replay is full (training). Judged by slope, not by size.

    .venv/bin/python benchmarks/soak.py [--parts serving,training] [--minutes 15]
                                        [--training-minutes 20] [--sample-s 10]

serving: `rayline serve --replicas 2` with a DQN policy, an XGBoost model and a
recommender, a mixed load on 32 keep-alive connections (the three routes in turn); every
--reload-s (120) each model's `production` alias moves to its other version (hot
reloads under load); one gateway replica is SIGKILLed at the middle.
training: `rayline train pipelines/dqn-cartpole.yaml` with the stop on solving off, for
--training-minutes, replay snapshots every 60 s and the learner's state kept every 500
updates (the defaults), a replay of 100,000 transitions that fills in the first minutes.

Every --sample-s: the memory of each process the command started (PSS less the object
store's shared pages, from /proc: the driver, Serve's controller and proxy, the front,
the replicas; the trial, learner, replay shards, collectors and evaluator; the raylet
and GCS), and the object store's used bytes from the node's metrics endpoint. After the
warm-up (the first 20 %), the least-squares slope of each in MB per hour. Last stdout
line:
{"serving": {"minutes", "requests", "errors", "errors_503", "lost", "rps_first",
 "rps_last", "rps_by_minute", "rps_ratio", "core_speed_by_minute", "reloads", "killed",
 "processes": {name: {"mb_start", "mb_end", "slope_mb_per_h", "slope_minutes"}},
 "object_store_slope_mb_per_h"},
 "training": {"minutes", "env_steps", "updates", "processes": {...},
 "object_store_slope_mb_per_h", "env_steps_per_s_first", "env_steps_per_s_last",
 "env_steps_per_s_by_minute", "env_steps_per_s_ratio", "core_speed_by_minute"}}
`errors` are answers other than 200 and 503 (the kill's); `lost` are requests whose
connection broke before an answer (`lost_at_s`: the seconds they were lost in); rps and
env steps/s are of the first minute after the warm-up and of the last minute;
`*_by_minute` has every minute after the warm-up and their trend in % of the mean per
hour. The machine's own speed moves too (a VM's cores, by a third within a minute on the
2-core host of docs/benchmarks.md): every 2 s a fixed piece of Python is timed by its
own CPU time (`core_speed`, millions of steps per CPU-second), and `*_ratio` gives last
/ first both as measured and at equal core speed (each minute's throughput divided by
its core speed). --series FILE also keeps every sample: memory, each process's and the
host's CPU seconds (busy, idle, stolen), the answers of every second, the reloads and
the kill.
"""

import argparse
import asyncio
import contextlib
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from common import children_of, cpu_seconds, emit, log, stop, wait_ready

HERE = os.path.dirname(os.path.abspath(__file__))
RAYLINE = os.path.join(os.path.dirname(sys.executable), "rayline")
series: dict = {}
"""Every sample of each part (--series)."""
PORT = 18611
WARMUP = 0.2
SLOPE_TARGET_MB_PER_H = 20.0


# What is sampled: the processes under one command, by role.


def role_of(pid: int, root: int, root_name: str) -> str | None:
    """What the process is: a Ray worker's title (`ray::LearnerActor.learn` ->
    LearnerActor), Ray's daemons by name; None for idle pooled workers and helpers."""
    if pid == root:
        return root_name
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    if argv[0].startswith("ray::"):
        title = argv[0][len("ray::") :].split(" ")[0]
        if title in ("IDLE", "IDLE_SPILL_WORKER", "IDLE_RESTORE_WORKER"):
            return None
        if "ServeReplica:" in title:  # "SERVE_REPLICA::...:ServeReplica:app:Name.method"
            return title[title.index("ServeReplica:") :].split(".")[0]
        return title.split(".")[0]
    command = " ".join(argv)
    for needle, name in (
        ("raylet/raylet", "raylet"),
        ("gcs_server", "gcs_server"),
        ("dashboard/agent.py", "dashboard_agent"),
        ("runtime_env/agent/main.py", "runtime_env_agent"),
        ("log_monitor.py", "log_monitor"),
        ("dashboard/dashboard.py", "dashboard"),
        ("monitor.py", "monitor"),
        ("haproxy", "haproxy"),
    ):
        if needle in command:
            return name
    return None


def own_mb(pid: int) -> float | None:
    """The process's proportional share of its memory (PSS) less its share of shared
    memory: a worker maps the object store's pages as it reads objects, which would
    count the store once per reader (the store is measured on its own)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("Pss", "Pss_Shmem"):
                    fields[name] = int(value.split()[0])
    except OSError:
        return None
    if "Pss" not in fields:
        return None
    return (fields["Pss"] - fields.get("Pss_Shmem", 0)) / 1024


def host_cpu_s() -> dict[str, float]:
    """The machine's CPU seconds so far, all cores: busy, idle and stolen (a VM's
    cores given to another guest: throughput that falls with nothing here using more)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    tick = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return {"busy": busy / tick, "idle": (idle + iowait) / tick, "steal": steal / tick}


def core_speed() -> float:
    """Millions of fixed Python steps per second of this thread's own CPU time: how fast
    a core runs while this thread has it (waits for a core are not CPU time). On a VM it
    moves with what the host's other guests do, by a third within a minute here."""
    started = time.thread_time()
    total = 0
    for i in range(300_000):
        total += i
    return 0.3 / max(time.thread_time() - started, 1e-9)


class Periodic:
    """`tick()` every `every_s` seconds in a thread, from `start()` to `stop()`."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.tick()
            self.stopping.wait(self.every_s)

    def tick(self) -> None:
        raise NotImplementedError


class CoreSpeed(Periodic):
    """`core_speed` every `every_s` seconds (about 13 ms of one core each), so that a
    minute's throughput can be set against how fast the machine ran then."""

    def __init__(self, every_s: float = 2.0):
        super().__init__(every_s)
        self.points: list[tuple[float, float]] = []
        """(unix time, speed)"""

    def tick(self) -> None:
        self.points.append((time.time(), core_speed()))

    def mean(self, start_unix: float, end_unix: float) -> float | None:
        inside = [speed for t, speed in self.points if start_unix <= t < end_unix]
        return round(float(np.mean(inside)), 2) if inside else None


def equal_speed_ratio(first: float | None, last: float | None, speeds: tuple) -> dict:
    """last / first as measured, and with each divided by the core speed of its minute:
    what is left of a change when the machine's own speed is taken out."""
    speed_first, speed_last = speeds
    ratio = last / first if first and last is not None else None
    adjusted = ratio * speed_first / speed_last if ratio and speed_first and speed_last else None
    return {
        "ratio": round(ratio, 3) if ratio is not None else None,
        "ratio_at_equal_core_speed": round(adjusted, 3) if adjusted is not None else None,
        "core_speed_first": speed_first,
        "core_speed_last": speed_last,
    }


def metrics_port(pids: list[int]) -> int | None:
    """The node's metrics endpoint: the port Ray wrote in its session folder, found from
    the raylet's command line (it picks the port at start)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
        except OSError:
            continue
        if "raylet/raylet" not in command:
            continue
        session = re.search(r"--session-name=(session_[^\s\x00]+)", command)
        temp = re.search(r"--temp-dir=([^\s\x00]+)", command)
        if session and temp:
            for path in glob.glob(f"{temp[1]}/{session[1]}/metrics_export_port_*"):
                with open(path) as f:
                    return int(f.read().strip())
    return None


def object_store_used_mb(port: int | None) -> float | None:
    """The object store's used bytes (Ray's ray_object_store_used_memory), in MB."""
    if port is None:
        return None
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    for line in text.decode().splitlines():
        if line.startswith("ray_object_store_used_memory{"):
            return float(line.rsplit(" ", 1)[1]) / 2**20
    return None


class Sampler(Periodic):
    """Every `every_s`, each process's memory and CPU seconds, the host's CPU seconds and
    the object store's used MB, in a thread."""

    def __init__(self, root: int, root_name: str, every_s: float):
        super().__init__(every_s)
        self.root = root
        self.named = (root, root_name)
        self.samples: dict[int, tuple[str, list[tuple[float, float]]]] = {}
        self.store: list[tuple[float, float]] = []
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self.host: list[tuple[float, dict]] = []
        self.started = time.monotonic()

    def start(self) -> "Sampler":
        self.started, self.started_unix = time.monotonic(), time.time()
        return super().start()

    def tick(self) -> None:
        now = time.monotonic() - self.started
        pids = children_of(self.root)
        for pid in pids:
            # A process's role is what it was first seen as (Ray retitles a worker by
            # the method it runs).
            role = self.samples[pid][0] if pid in self.samples else role_of(pid, *self.named)
            mb = own_mb(pid) if role else None
            if mb is not None:
                self.samples.setdefault(pid, (role, []))[1].append((now, mb))
                with contextlib.suppress(OSError):  # gone since its memory was read
                    self.cpu.setdefault(pid, []).append((now, cpu_seconds(pid)))
        self.cpu.setdefault(os.getpid(), []).append((now, cpu_seconds(os.getpid())))
        self.host.append((now, host_cpu_s()))
        used = object_store_used_mb(metrics_port(pids))
        if used is not None:
            self.store.append((now, used))

    def series(self) -> dict:
        """Every sample: {name: [[s, MB], ...]}, the object store's under "object_store"."""
        roles = [role for role, _ in self.samples.values()]
        out = {
            (role if roles.count(role) == 1 else f"{role}[{pid}]"): [
                [round(t, 1), round(mb, 1)] for t, mb in points
            ]
            for pid, (role, points) in sorted(self.samples.items())
        }
        out["object_store"] = [[round(t, 1), round(mb, 2)] for t, mb in self.store]
        # CPU seconds so far: each process's (this script, the load, as "soak"), the host's.
        names = {pid: f"{role}[{pid}]" for pid, (role, _) in self.samples.items()}
        names[os.getpid()] = "soak"
        out["cpu_s"] = {
            names[pid]: [[round(t, 1), round(s, 2)] for t, s in points]
            for pid, points in self.cpu.items()
            if pid in names
        }
        out["host_cpu_s"] = [
            [round(t, 1), {k: round(v, 2) for k, v in h.items()}] for t, h in self.host
        ]
        return out

    def report(self, until_unix_s: float | None = None) -> dict:
        """Per process (a role's name, with its pid where the role has several or was
        replaced): MB at the first and last sample and the slope after the warm-up (the
        first 20 % of the run, from the process's own first sample), up to
        `until_unix_s` where given (the end of the work: what a process does as the
        command exits is not what it did while held)."""
        end = time.monotonic() - self.started
        if until_unix_s is not None:
            end = min(end, until_unix_s - self.started_unix)
        roles = [role for role, _ in self.samples.values()]
        processes = {}
        for pid, (role, points) in sorted(self.samples.items()):
            name = role if roles.count(role) == 1 else f"{role}[{pid}]"
            processes[name] = {
                "mb_start": round(points[0][1], 1),
                "mb_end": round(points[-1][1], 1),
                # A process started mid-run (a replica Serve put in place of the killed
                # one) warms up as long as the first ones did, from its own start.
                "slope_mb_per_h": slope_mb_per_h(points, points[0][0] + WARMUP * end, end),
                # What the slope spans: a replica killed at the middle has minutes, where
                # one step (a reload's) weighs as much as a steady climb.
                "slope_minutes": round(
                    max(0.0, min(points[-1][0], end) - points[0][0] - WARMUP * end) / 60, 1
                ),
                "samples": len(points),
            }
        return {
            "processes": processes,
            "object_store_slope_mb_per_h": slope_mb_per_h(self.store, WARMUP * end, end),
            "object_store_mb_end": round(self.store[-1][1], 1) if self.store else None,
        }


def slope_mb_per_h(
    points: list[tuple[float, float]], after_s: float, until_s: float
) -> float | None:
    """Least-squares slope of (seconds, MB) from `after_s` to `until_s`, in MB per hour;
    None with fewer than 3 points there (a process that lived only through the warm-up)."""
    kept = [(t, mb) for t, mb in points if after_s <= t <= until_s]
    if len(kept) < 3:
        return None
    t, mb = np.array(kept).T
    if np.ptp(t) == 0:
        return None
    return round(float(np.polyfit(t / 3600.0, mb, 1)[0]), 2)


def by_minute(rate, start_s: float, end_s: float) -> dict:
    """`rate(a, b)` for each whole minute from `start_s` to `end_s`, and its least-squares
    trend in % of the mean per hour: one minute against another moves with what that
    minute held (an evaluation of long CartPole episodes shares the 2 cores), the trend
    says whether the run slows down."""
    minutes = [rate(a, a + 60) for a in np.arange(start_s, end_s - 59, 60.0)]
    rates = [r for r in minutes if r is not None]
    trend = None
    if len(rates) >= 3 and np.mean(rates) > 0:
        per_minute = float(np.polyfit(np.arange(len(rates)), rates, 1)[0])
        trend = round(100.0 * 60.0 * per_minute / float(np.mean(rates)), 1)
    return {"per_minute": minutes, "trend_pct_per_h": trend}


def judged(report: dict) -> dict:
    """The processes over the slope target (those that lived past the warm-up)."""
    over = {
        name: p["slope_mb_per_h"]
        for name, p in report["processes"].items()
        if p["slope_mb_per_h"] is not None and p["slope_mb_per_h"] > SLOPE_TARGET_MB_PER_H
    }
    return {"slope_target_mb_per_h": SLOPE_TARGET_MB_PER_H, "over_target": over}


# Serving.


def make_store(path: str) -> None:
    """Two versions each of a CartPole-sized DQN policy, an XGBoost classifier and a
    user-kNN recommender (the same model twice: a reload loads it again); v1 promoted."""
    import torch

    from rayline.boosting.data import Table, infer_task
    from rayline.boosting.train import BestRound, TreeParams, booster_params, fit
    from rayline.recsys.data import synthetic_ratings
    from rayline.recsys.knn import UserKNN
    from rayline.rl.networks import NetworkSpec, build_q_network
    from rayline.store import ModelRegistry

    registry = ModelRegistry(path)
    spec = NetworkSpec([4], 2, [64, 64], dueling=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)).astype(np.float32)
    table = Table(x, (x[:, 2] > 0).astype(np.int64), ["a", "b", "c"], ["q"] * 3, {})
    train, valid = table.subset(np.arange(480)), table.subset(np.arange(480, 600))
    task = infer_task(train.label)
    params = booster_params(TreeParams(max_depth=4), task, threads=1, seed=0)
    data, _ = synthetic_ratings(610, 2000, density=0.05, seed=0)
    for seed in (1, 2):
        torch.manual_seed(seed)
        buffer = io.BytesIO()
        torch.save(build_q_network(spec).state_dict(), buffer)
        files = {"policy.pt": buffer.getvalue(), "network.json": json.dumps(spec.__dict__).encode()}
        registry.register("policy", files, kind="dqn")
        booster = fit(
            params, task, train.dmatrix(), valid.dmatrix(), rounds=30, tracker=BestRound(task, 0)
        )
        registry.register("risk", booster.files(), kind="xgboost")
        knn = UserKNN(similarity="cosine", k=50, shrinkage=0, power=2).fit(data)
        registry.register("movies", knn.save(), kind="recommender")
    for name in ("policy", "risk", "movies"):
        registry.promote(name, 1)


MIXED = [
    ("POST", "/dqn/policy/act", {"observations": [0.01, -0.02, 0.03, 0.04]}),
    ("POST", "/xgboost/risk/predict", {"rows": [{"a": 0.1, "b": -0.3, "c": 0.5}]}),
    ("GET", "/recommend/{user}?k=10", None),
]


class Load:
    """`concurrency` keep-alive connections sending the MIXED routes in turn; answers
    counted per second by status."""

    def __init__(self, port: int, concurrency: int):
        self.port, self.concurrency = port, concurrency
        self.per_second: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.lost_at: list[float] = []
        """When each request was lost (its connection broke before an answer)."""
        self.started = time.monotonic()
        self.started_unix = time.time()

    def requests(self) -> list[bytes]:
        out = []
        for method, path, body in MIXED:
            users = range(0, 610, 7) if "{user}" in path else [0]
            for user in users:
                payload = json.dumps(body).encode() if body is not None else b""
                head = f"{method} {path.format(user=user)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                if body is not None:
                    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                out.append((head + "\r\n").encode() + payload)
        return out

    async def run(self, seconds: float) -> None:
        requests = self.requests()
        # The three routes in turn, whatever the number of users: policy, risk, a user.
        dqn, risk, users = requests[0], requests[1], requests[2:]
        deadline = self.started + seconds

        async def one(index: int) -> None:
            reader = writer = None
            turn = index
            while time.monotonic() < deadline:
                turn += 1
                request = (dqn, risk, users[turn % len(users)])[turn % 3]
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.write(request)
                    status, closing = await read_answer(reader)
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                    self.lost_at.append(time.monotonic() - self.started)
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    await asyncio.sleep(0.05)
                    continue
                if closing:  # the server said so (a reloading front): a new connection
                    writer.close()
                    reader = writer = None
                second = int(time.monotonic() - self.started)
                self.per_second[second] = self.per_second.get(second, 0) + 1
                self.statuses[status] = self.statuses.get(status, 0) + 1
            if writer is not None:
                writer.close()

        await asyncio.gather(*(one(i) for i in range(self.concurrency)))

    def rps(self, start_s: float, end_s: float) -> float:
        seconds = range(int(start_s), int(end_s))
        return round(sum(self.per_second.get(s, 0) for s in seconds) / max(len(seconds), 1), 1)


async def read_answer(reader) -> tuple[int, bool]:
    """(status, whether the server closes the connection after it), as a client that
    honours `Connection: close` reads an answer."""
    status = int((await reader.readline()).split()[1])
    length, chunked, closing = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            closing = True
    if not chunked:
        await reader.readexactly(length)
        return status, closing
    while (size := int((await reader.readline()).strip(), 16)) > 0:
        await reader.readexactly(size + 2)
    await reader.readline()
    return status, closing


def gateway_replicas(root: int) -> list[int]:
    return [
        pid
        for pid in children_of(root)
        if (role_of(pid, root, "") or "").startswith("ServeReplica:rayline:Gateway")
    ]


def soak_serving(args, workdir: str) -> dict:
    from rayline.store import ModelRegistry

    store = os.path.join(workdir, "store")
    make_store(store)
    registry = ModelRegistry(store)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [RAYLINE, "serve", "--store", store, "--port", str(PORT), "--replicas", "2"]
    log(f"serving: {' '.join(command[1:])} ...")
    with open(f"{workdir}/serve.log", "w") as console:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=console)
        try:
            wait_ready(f"http://127.0.0.1:{PORT}/healthz", timeout_s=180)
            deadline = time.monotonic() + 120
            while len(gateway_replicas(server.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(1)
            seconds = args.minutes * 60
            load = Load(PORT, args.concurrency)
            sampler = Sampler(server.pid, "rayline serve", args.sample_s).start()
            speed = CoreSpeed().start()
            reloads, killed = [], []

            async def operator() -> None:
                """Hot reloads every reload_s, and one replica killed at the middle."""
                started = time.monotonic()
                next_reload, kill_at = args.reload_s, seconds / 2
                while time.monotonic() - started < seconds - 1:
                    now = time.monotonic() - started
                    if now >= next_reload:
                        for name in ("policy", "risk", "movies"):
                            serving = registry.resolve(name, "production")
                            await asyncio.to_thread(registry.promote, name, 3 - serving)
                        reloads.append(round(now, 1))
                        next_reload += args.reload_s
                    if not killed and now >= kill_at:
                        replicas = gateway_replicas(server.pid)
                        if replicas:
                            os.kill(replicas[0], signal.SIGKILL)
                            killed.append(round(now, 1))
                            log(f"  killed gateway replica {replicas[0]} at {now:.0f} s")
                    await asyncio.sleep(1)

            async def progress() -> None:
                started = time.monotonic()
                while time.monotonic() - started < seconds - 1:
                    await asyncio.sleep(60)
                    done = time.monotonic() - started
                    log(
                        f"  {done / 60:.0f} min: {sum(load.statuses.values())} answers, "
                        f"statuses {load.statuses}, lost {len(load.lost_at)}, "
                        f"{load.rps(done - 60, done)} req/s"
                    )

            async def everything() -> None:
                await asyncio.gather(load.run(seconds), operator(), progress())

            asyncio.run(everything())
            sampler.stop()
            speed.stop()
            report = sampler.report()
            series["serving"] = {
                **sampler.series(),
                # On the load's clock, which starts at load_started_s of the sampler's.
                "answers_per_s": [load.per_second.get(s, 0) for s in range(int(seconds))],
                "load_started_s": round(load.started - sampler.started, 2),
                "reloads_at_s": reloads,
                "killed_at_s": killed,
            }
        finally:
            stop(server, signal.SIGTERM, 120)
    warm = WARMUP * seconds

    def at(start_s: float, end_s: float) -> float | None:  # seconds of the load's clock
        return speed.mean(load.started_unix + start_s, load.started_unix + end_s)

    first_minute, last_minute = (warm, warm + 60), (seconds - 61, seconds - 1)
    rps_first, rps_last = load.rps(*first_minute), load.rps(*last_minute)

    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": sum(load.statuses.values()) + len(load.lost_at),
        "errors": sum(n for s, n in load.statuses.items() if s not in (200, 503)),
        "errors_503": load.statuses.get(503, 0),
        "lost": len(load.lost_at),
        "lost_within_30s_of_kill": sum(any(0 <= t - k <= 30 for k in killed) for t in load.lost_at),
        "lost_at_s": sorted({round(t) for t in load.lost_at}),
        "statuses": {str(s): n for s, n in sorted(load.statuses.items())},
        "rps_first": rps_first,
        "rps_last": rps_last,
        "rps_by_minute": by_minute(load.rps, warm, seconds - 1),
        "rps_ratio": equal_speed_ratio(rps_first, rps_last, (at(*first_minute), at(*last_minute))),
        "core_speed_by_minute": by_minute(at, warm, seconds - 1),
        "reloads": len(reloads),
        "killed": killed,
        **report,
        **judged(report),
    }


# Training.


def trial_results(storage: str) -> list[dict]:
    rows = []
    for path in glob.glob(os.path.join(storage, "soak", "*", "result.json")):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the line Tune is writing now
                    continue
    return sorted(rows, key=lambda r: r.get("time_total_s", 0))


def steps_per_s(rows: list[dict], start_s: float, end_s: float) -> float | None:
    """Env steps per second between the reports nearest `start_s` and `end_s` of the
    trial's own clock (time_total_s)."""
    inside = [r for r in rows if start_s <= r.get("time_total_s", -1) <= end_s]
    if len(inside) < 2:
        return None
    first, last = inside[0], inside[-1]
    elapsed = last["time_total_s"] - first["time_total_s"]
    steps = last["env_steps_sampled"] - first["env_steps_sampled"]
    return round(steps / elapsed, 1) if elapsed > 0 else None


def soak_training(args, workdir: str) -> dict:
    seconds = args.training_minutes * 60
    storage = os.path.join(workdir, "results")
    overrides = {
        "eval.solved_return": "null",
        "run.name": "soak",
        "run.total_env_steps": "1000000000",
        "run.max_wall_s": str(seconds),
        "run.register": "false",
        "run.checkpoint_every_env_steps": "100000",
        "run.storage_path": storage,
        "run.store_uri": os.path.join(workdir, "store-training"),
        "replay.capacity": "100000",
        "replay.snapshot_every_s": "60",
    }
    command = [RAYLINE, "train", os.path.join(HERE, "..", "pipelines", "dqn-cartpole.yaml")]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    log(f"training: rayline train dqn-cartpole for {args.training_minutes} min ...")
    with open(f"{workdir}/train.log", "w") as console:
        trainer = subprocess.Popen(
            command,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
        sampler = Sampler(trainer.pid, "rayline train", args.sample_s).start()
        speed = CoreSpeed().start()
        started = time.monotonic()
        try:
            while trainer.poll() is None:
                time.sleep(5)
                if time.monotonic() - started > seconds + 600:
                    raise RuntimeError(
                        "the training run did not end 10 minutes past its max_wall_s"
                    )
                rows = trial_results(storage)
                if rows and int(time.monotonic() - started) % 60 < 5:
                    last = rows[-1]
                    log(
                        f"  {last['time_total_s']:.0f} s: {last['env_steps_sampled']} env steps, "
                        f"{last.get('learner_updates')} updates, replay {last.get('replay_size')}"
                    )
        finally:
            sampler.stop()
            speed.stop()
            if trainer.poll() is None:
                stop(trainer, signal.SIGTERM, 120)
        if trainer.returncode != 0:
            with open(f"{workdir}/train.log") as f:
                raise RuntimeError(f"rayline train exited {trainer.returncode}: {f.read()[-3000:]}")
    rows = trial_results(storage)
    # Up to the trial's last report before its final one (the final evaluation,
    # checkpoint and the command's exit come after it).
    report = sampler.report(rows[-2]["timestamp"] if len(rows) > 1 else None)
    series["training"] = sampler.series()
    last = rows[-1]
    end = last["time_total_s"]
    warm = WARMUP * end
    # The trial's clock (time_total_s) to unix time, for the core speed of its minutes.
    offset = float(np.median([r["timestamp"] - r["time_total_s"] for r in rows]))

    def at(start_s: float, end_s: float) -> float | None:
        return speed.mean(offset + start_s, offset + end_s)

    first_minute, last_minute = (warm, warm + 60), (end - 60, end)
    steps_first, steps_last = steps_per_s(rows, *first_minute), steps_per_s(rows, *last_minute)

    return {
        "minutes": args.training_minutes,
        "env_steps": last["env_steps_sampled"],
        "updates": last.get("learner_updates"),
        "replay_size_end": last.get("replay_size"),
        "env_steps_per_s_first": steps_first,
        "env_steps_per_s_last": steps_last,
        "env_steps_per_s_by_minute": by_minute(lambda a, b: steps_per_s(rows, a, b), warm, end),
        "env_steps_per_s_ratio": equal_speed_ratio(
            steps_first, steps_last, (at(*first_minute), at(*last_minute))
        ),
        "core_speed_by_minute": by_minute(at, warm, end),
        **report,
        **judged(report),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="serving,training", help="serving, training or both")
    parser.add_argument("--minutes", type=float, default=15.0, help="of serving")
    parser.add_argument("--training-minutes", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reload-s", type=float, default=120.0, help="between alias moves")
    parser.add_argument("--sample-s", type=float, default=10.0, help="between memory samples")
    parser.add_argument(
        "--series", default="", metavar="FILE", help="also write every sample there (JSON)"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"serving", "training"}:
        parser.error(f"--parts: unknown {', '.join(sorted(parts - {'serving', 'training'}))}")
    if min(args.minutes, args.training_minutes) < 2:
        parser.error("--minutes and --training-minutes: at least 2 (a first and a last minute)")
    result = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        if "serving" in parts:
            result["serving"] = soak_serving(args, workdir)
            log(f"serving: {json.dumps(result['serving'])}")
        if "training" in parts:
            result["training"] = soak_training(args, workdir)
            log(f"training: {json.dumps(result['training'])}")
    if args.series:
        with open(args.series, "w") as f:
            json.dump(series, f)
    emit(result)


if __name__ == "__main__":
    main()
