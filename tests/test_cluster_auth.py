"""`ray job submit` against a head with Ray's token auth on, the client getting its token
as docs/cluster.md says: on the head `ray get-auth-token --generate`, then
`ray start --head`; on the laptop RAY_AUTH_MODE=token and the token in a file named by
RAY_AUTH_TOKEN_PATH. Head and laptop have homes of their own; the head is stopped by its
pid (never `ray stop`)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayline.store import ModelRegistry

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound to 0 and released together)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this one
    return {**env, "HOME": str(home), "PATH": path, **extra}


def test_job_submit_with_the_token_as_the_readme_says(tmp_path):
    head_home, laptop_home = tmp_path / "head", tmp_path / "laptop"
    head_home.mkdir()
    laptop_home.mkdir()
    head_env = _env(head_home, RAY_AUTH_MODE="token")
    ray_tmp = tempfile.mkdtemp(prefix="rl-auth-", dir="/tmp")
    gcs, dashboard, agent, client, metrics = _free_ports(5)
    token = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=head_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert len(token) >= 16
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={ray_tmp}",  # short: Ray's socket paths must fit 107 bytes
            "--disable-usage-stats",
            "--block",
        ],
        env=head_env,
        stdout=open(tmp_path / "head.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        token_file = laptop_home / "cluster-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        laptop = _env(laptop_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dashboard}",
            "--",
            "python",
            "-c",
            "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])",
        ]
        deadline, done = time.time() + 120, None
        while time.time() < deadline:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            done = subprocess.run(submit, env=laptop, capture_output=True, text=True, timeout=120)
            if done.returncode == 0 or "Missing authentication" in done.stdout + done.stderr:
                break
            time.sleep(2)  # the head's dashboard is still coming up
        assert done.returncode == 0, (
            done.stdout[-2000:] + done.stderr[-2000:] + (tmp_path / "head.log").read_text()[-3000:]
        )
        assert "cpus 2.0" in done.stdout and "succeeded" in done.stdout
        assert token not in done.stdout + done.stderr
        # Without the token the same submission is refused.
        refused = subprocess.run(
            submit, env=_env(laptop_home), capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0
        assert "authentication" in (refused.stdout + refused.stderr).lower()
        # A training job exactly as docs/cluster.md shows, from the repository's root.
        trained = subprocess.run(
            [
                *submit[:4],
                "--runtime-env",
                "deploy/runtime-env.yaml",
                "--",
                "rayline",
                "train",
                "pipelines/dqn-cartpole.yaml",
                "--set",
                "run.total_env_steps=2000",
                "--set",
                f"run.storage_path={tmp_path / 'results'}",
                "--set",
                f"run.store_uri={tmp_path / 'store'}",
            ],
            cwd=ROOT,
            env=laptop,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-2000:]
        assert "succeeded" in trained.stdout and "registered dqn-cartpole v1" in trained.stdout
        registered = ModelRegistry(str(tmp_path / "store")).get("dqn-cartpole")
        assert registered.kind == "dqn" and "registered_eval_return" in registered.metrics
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
