"""The GPU check, prepared before a GPU machine is lent: its dry run runs every part on
the CPU and writes the JSON and the learning curve, and without cuda it says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_dry_run_measures_every_part_and_writes_its_json_and_curve(ray_session, tmp_path):
    # Its Pong run joins this worker's Ray, as `ray job submit` would: a Ray of its own
    # took 10-15 s of the suite's 2 cores to start and stop, and is not what is checked.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ray_session["address"]},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["device"]["name"] == "cpu"
    assert report["device"]["torch"] == torch.__version__
    for model in ("cartpole_mlp", "pong_cnn"):
        rates = report["learner"][model]["cpu"]
        assert set(rates) == {"float32", "bfloat16"}
        assert all(r["updates_per_s"] > 0 and r["first_fetch_s"] >= 0 for r in rates.values())
    for model in ("transfer_resnet18", "fcn8s_resnet18"):
        speeds = report["vision"][model]
        assert set(speeds) == {"float32", "bfloat16", "channels_last", "bfloat16_channels_last"}
        assert all(s["train_images_per_s"] > 0 for s in speeds.values())
    pong = report["pong"]
    assert pong["env_steps"] > 0 and pong["frames"] == 4 * pong["env_steps"]
    assert pong["learner_updates"] > 0 and pong["env_steps_per_s"] > 0
    assert pong["curve"] and all(len(point) == 3 for point in pong["curve"])
    assert -21 <= pong["curve"][-1][2] <= 21  # a Pong score
    assert set(pong["busy_shares"]) == {"collect", "learn", "learner_replay_wait", "driver_wait"}
    assert pong["predicted_env_steps_per_s"] > 0
    assert pong["bound_by"] in {"collectors", "replay", "learner", "driver", "cores"}
    assert report["gpu_samples"] == {"sampled": False}  # no nvidia-smi on this machine
    with Image.open(tmp_path / "pong_curve.png") as image:
        assert image.format == "PNG" and image.size == (640, 360)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here; nothing measured (--dry-run tries every part)"
    ]
    assert not (tmp_path / "gpu_check.json").exists()
