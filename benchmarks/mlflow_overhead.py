"""What MLflow tracking costs a run: `rayline train pipelines/dqn-cartpole.yaml` to a fixed
budget (no early stop), with tracking and the registry mirror on against off,
alternated on this machine in the same run, against a real `mlflow server` (SQLite).

    .venv/bin/python benchmarks/mlflow_overhead.py [--pairs 2] [--env-steps 30000]

Wall time is launch to exit of `rayline train` (Ray's start and registration included).
The last stdout line is one JSON object:
{"off_wall_s": [...], "on_wall_s": [...], "off_median_s", "on_median_s",
 "ratio": on / off medians, "metric_points": points MLflow holds for one tracked run}
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import emit, free_port, log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(folder: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            f"{folder}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not answer in 120 s")


def train(workdir: str, name: str, env_steps: int, uri: str | None) -> float:
    rayline = os.path.join(os.path.dirname(sys.executable), "rayline")
    command = [rayline, "train", os.path.join(REPO, "pipelines", "dqn-cartpole.yaml")]
    settings = {
        "run.name": name,
        "run.storage_path": f"{workdir}/results",
        "run.store_uri": f"{workdir}/store",
        "run.total_env_steps": env_steps,
        "eval.solved_return": "null",
    }
    if uri:
        settings.update({"run.mlflow.tracking_uri": uri, "run.mlflow.registry": "true"})
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    subprocess.run(
        command + ["--metrics-port", "0"], check=True, stdout=subprocess.DEVNULL, cwd=REPO
    )
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--env-steps", type=int, default=30_000)
    args = parser.parse_args()
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="mlflow-overhead-") as workdir:
        server, uri = start_server(workdir)
        try:
            off, on = [], []
            for pair in range(args.pairs):
                for tracked in (False, True) if pair % 2 == 0 else (True, False):
                    name = f"{'on' if tracked else 'off'}-{pair}"
                    wall = train(workdir, name, args.env_steps, uri if tracked else None)
                    (on if tracked else off).append(round(wall, 2))
                    log(f"{name}: {wall:.1f} s")
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("on-0")
            (run,) = client.search_runs([experiment.experiment_id])
            points = sum(
                len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics
            )
        finally:
            os.killpg(server.pid, signal.SIGKILL)
    off_median, on_median = statistics.median(off), statistics.median(on)
    emit(
        {
            "off_wall_s": off,
            "on_wall_s": on,
            "off_median_s": off_median,
            "on_median_s": on_median,
            "ratio": round(on_median / off_median, 3),
            "metric_points": points,
        }
    )


if __name__ == "__main__":
    main()
