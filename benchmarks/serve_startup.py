"""`rayline serve` from launch to its first answered request, against the plain FastAPI +
uvicorn peer serving the same predictors, each started as a fresh process.

    .venv/bin/python benchmarks/serve_startup.py [--repeats 3]

Both serve a DQN policy and a recommender from one store (serve_load.py's); the clock
runs from the process's launch to the first 200 from POST /dqn/policy/act. Last stdout
line: {"rayline": {"first_answer_s": [...], "median_first_answer_s", "startup_phases":
{"python_imports", "ray_init", "serve_start", "replicas_ready"} (medians, from the
creation times of the processes it starts)},
       "plain": {...}, "ratio_vs_plain"}.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import children_of, emit, log, stop
from rayline.startup import process_started_unix_s
from serve_load import ROUTES, make_store

PORT = 18431


# The processes `rayline serve` starts on its way to the first answer, in the order the
# phases end: (phase, the process whose creation ends it: a prefix of its command line).
PHASES = (
    ("python_imports", "gcs_server"),  # the CLI's imports and checks, then Ray starts
    ("ray_init", "ray::ServeController"),  # Ray's processes, then serve.start
    ("serve_start", "ray::ServeReplica"),  # the controller and proxy, then the replicas
)


def process_tree(root: int, seen: dict[int, dict]) -> None:
    """Add `root`'s descendants to `seen` (pid -> {"created": unix s, "name": its command
    line, which a Ray worker renames once it knows its role})."""
    for pid in children_of(root)[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if pid not in seen:
            seen[pid] = {"created": process_started_unix_s(pid), "name": name}
        elif name:
            seen[pid]["name"] = name


def phases(launched: float, answered: float, seen: dict[int, dict]) -> dict:
    """Seconds each phase took, from the processes' creation times; `replicas_ready` is
    from the first replica's creation to the first answer (its imports, its models'
    loading, the front)."""
    ends = []
    for _, prefix in PHASES:
        created = [p["created"] for p in seen.values() if prefix in p["name"].split(" ")[0]]
        ends.append(min(created) if created else None)
    out, start = {}, launched
    for (phase, _), end in zip(PHASES, ends):
        out[phase] = round(end - start, 2) if end and start else None
        start = end or None
    out["replicas_ready"] = round(answered - start, 2) if start else None
    return out


def first_answer_s(
    command: list[str], url: str, body: dict, timeout_s: float = 180
) -> tuple[float, dict]:
    """Seconds from launching `command` to the first 200 from POSTing `body` to `url`,
    and the phases of that time (`phases`); the process is stopped (SIGINT, as Ctrl-C)
    and waited for afterwards."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen: dict[int, dict] = {}
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    # On the clock of /proc's creation times (whole-second boot time: up to 1 s off
    # time.time()), as the processes it starts are timed.
    launched = process_started_unix_s(proc.pid)
    try:
        while time.monotonic() - started < timeout_s:
            process_tree(proc.pid, seen)
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {proc.returncode} before answering")
            try:
                if httpx.post(url, json=body, timeout=5).status_code == 200:
                    seconds = time.monotonic() - started
                    if os.environ.get("SERVE_STARTUP_TIMELINE"):
                        for p in sorted(seen.values(), key=lambda p: p["created"]):
                            log(f"  {p['created'] - launched:6.2f} {p['name'][:70]}")
                    return seconds, phases(launched, launched + seconds, seen)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not answer in {timeout_s} s")
    finally:
        stop(proc, signal.SIGINT, 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, path, body = ROUTES["dqn_act"]
    url = f"http://127.0.0.1:{PORT}{path}"
    rayline = os.path.join(os.path.dirname(sys.executable), "rayline")
    peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_load.py")
    result = {}
    with tempfile.TemporaryDirectory(prefix="serve-startup-") as store:
        make_store(store)
        commands = {
            "rayline": [rayline, "serve", "--store", store, "--port", str(PORT)],
            "plain": [sys.executable, peer, "--plain-server", store, str(PORT)],
        }
        for system, command in commands.items():
            times, runs = [], []
            for repeat in range(args.repeats):
                seconds, run_phases = first_answer_s(command, url, body)
                times.append(round(seconds, 2))
                runs.append(run_phases)
                log(f"{system} #{repeat}: first answer after {times[-1]} s")
            result[system] = {
                "first_answer_s": times,
                "median_first_answer_s": statistics.median(times),
            }
            if system == "rayline":
                result[system]["startup_phases"] = {
                    phase: statistics.median(r[phase] for r in runs if r[phase] is not None)
                    for phase in runs[0]
                    if any(r[phase] is not None for r in runs)
                }
                log(f"  phases (medians): {result[system]['startup_phases']}")
    result["ratio_vs_plain"] = round(
        result["rayline"]["median_first_answer_s"] / result["plain"]["median_first_answer_s"], 2
    )
    emit(result)


if __name__ == "__main__":
    main()
