"""`rayline serve` from launch to its first answered request, against the plain FastAPI +
uvicorn peer serving the same predictors, each started as a fresh process.

    .venv/bin/python benchmarks/serve_startup.py [--repeats 3]

Both serve a DQN policy and a recommender from one store (serve_load.py's); the clock
runs from the process's launch to the first 200 from POST /dqn/policy/act. Last stdout
line: {"rayline": {"first_answer_s": [...], "median_first_answer_s"},
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

from common import emit, log, stop
from serve_load import ROUTES, make_store

PORT = 18431


def first_answer_s(command: list[str], url: str, body: dict, timeout_s: float = 180) -> float:
    """Seconds from launching `command` to the first 200 from POSTing `body` to `url`;
    the process is stopped (SIGINT, as Ctrl-C) and waited for afterwards."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {proc.returncode} before answering")
            try:
                if httpx.post(url, json=body, timeout=5).status_code == 200:
                    return time.monotonic() - started
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
            times = []
            for repeat in range(args.repeats):
                times.append(round(first_answer_s(command, url, body), 2))
                log(f"{system} #{repeat}: first answer after {times[-1]} s")
            result[system] = {
                "first_answer_s": times,
                "median_first_answer_s": statistics.median(times),
            }
    result["ratio_vs_plain"] = round(
        result["rayline"]["median_first_answer_s"] / result["plain"]["median_first_answer_s"], 2
    )
    emit(result)


if __name__ == "__main__":
    main()
