"""Ready for a GPU: one check that measures rayline's GPU paths on a GPU machine in under
9 minutes, and dry-runs anywhere (`--dry-run`: every part for a few seconds on the CPU).

    .venv/bin/python benchmarks/gpu_check.py --out DIR [--pong-minutes 5] [--dry-run]
    make gpu-check     # the same, into ./gpu-check

Parts, in order (the cheap ones first, so a cut-short run still says something):
  device    the card (name, memory), CUDA and torch versions; GPU utilisation and memory
            sampled every 0.5 s by nvidia-smi for the whole check
  learner   updates/s of the learner as its actor runs it (a fetch of stacked batches,
            one host sync per fetch), batch 256, CartPole's MLP and Pong's Nature CNN, for
            every learner.precision x learner.compile on cuda (compile time apart, as
            first_fetch_s), and float32 on the CPU for the ratio
  vision    training images/s of transfer (ResNet-18) and FCN-8s for float32, bfloat16
            and channels-last, on synthetic images
  pong      the Pong pipeline for a wall budget, the machine's cores as collectors and the
            GPU learner, evaluating every few minutes of play: the learning curve (env
            steps, frames, eval return), where time went (collector, replay wait, learner
            busy shares) and env steps/s beside the scale model's prediction for this
            machine (benchmarks/dqn_scale.py's, from parts measured here)

Writes DIR/gpu_check.json and DIR/pong_curve.png; the last stdout line is the JSON:
{"device", "dry_run", "gpu_samples", "learner": {model: {device: {setting: {"updates_per_s",
"first_fetch_s"}}}, "cuda_vs_cpu"}, "vision": {model: {setting: {"train_images_per_s"}}},
"pong": {"wall_s", "env_steps", "frames", "env_steps_per_s", "predicted_env_steps_per_s",
"bound_by", "curve": [[env_steps, frames, eval_return]], "busy_shares"}, "seconds"}.
On a machine without cuda and without --dry-run it says so in one line and exits 0.
With RAY_ADDRESS set, the Pong run joins that Ray rather than starting one of its own.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import emit, log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]
VISION_SETTINGS = {
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
    "channels_last": ("float32", True),
    "bfloat16_channels_last": ("bfloat16", True),
}


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"name": "cpu", "torch": torch.__version__, "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


class GPUSampler:
    """nvidia-smi in the background, one CSV line every 0.5 s."""

    def __init__(self, path: str):
        self.path, self.proc = path, None
        query = "--query-gpu=utilization.gpu,memory.used"
        try:
            with open(path, "w") as out:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "500"],
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                )
        except OSError:  # no nvidia-smi here
            self.proc = None

    def stop(self) -> dict:
        if self.proc is None:
            return {"sampled": False}
        self.proc.terminate()
        self.proc.wait(timeout=10)
        rows = []
        for line in Path(self.path).read_text().splitlines():
            try:
                rows.append([float(x) for x in line.split(",")[:2]])
            except ValueError:
                continue
        if not rows:
            return {"sampled": False}
        used = np.array(rows)
        return {
            "sampled": True,
            "samples": len(rows),
            "utilization_mean": round(float(used[:, 0].mean()), 1),
            "utilization_max": float(used[:, 0].max()),
            "memory_used_max_mib": float(used[:, 1].max()),
        }


def learner_part(device: str, seconds: float, dry_run: bool) -> dict:
    from dqn_scale import CARTPOLE, PONG, learner_rate, pipeline_config

    out: dict = {}
    for model, path in (("cartpole_mlp", CARTPOLE), ("pong_cnn", PONG)):
        # A dry run only shows the parts run: small batches, since a CPU without native
        # bfloat16 (AVX2 only) runs its bfloat16 kernels 30-100x slower than float32
        # (Pong's CNN at batch 32: 5 of the dry run's 50 s, for 4 updates).
        batch, per_fetch = (8, 1) if dry_run else (256, 4)
        cfg = pipeline_config(
            path, **{"learner.batch_size": batch, "learner.batches_per_fetch": per_fetch}
        )
        out[model] = {}
        for on in [device, "cpu"] if device == "cuda" else ["cpu"]:
            settings = SETTINGS if on == "cuda" else [("float32", False)]
            if dry_run:  # compiling on the CPU takes tens of seconds: that is not a dry run
                settings = [s for s in SETTINGS if not s[1]]
            out[model][on] = {}
            for precision, compiled in settings:
                name = precision + ("_compiled" if compiled else "")
                rate = learner_rate(cfg, on, seconds, precision, compiled)
                out[model][on][name] = rate
                log(f"  learner {model} {on} {name}: {rate}")
    if device == "cuda":
        out["cuda_vs_cpu"] = {
            model: round(
                max(r["updates_per_s"] for r in out[model]["cuda"].values())
                / out[model]["cpu"]["float32"]["updates_per_s"],
                2,
            )
            for model in ("cartpole_mlp", "pong_cnn")
        }
    return out


def vision_part(device: str, steps: int, size: int, batch_size: int = 16) -> dict:
    """Training images/s of each model and setting, on random images (the speed of the
    training step does not depend on what the pixels show)."""
    from rayline.vision import fcn, transfer

    out: dict = {}
    for model in ("transfer_resnet18", "fcn8s_resnet18"):
        out[model] = {}
        for name, (precision, channels_last) in VISION_SETTINGS.items():
            torch.manual_seed(0)
            images = torch.rand(batch_size * steps, 3, size, size)
            if model == "transfer_resnet18":
                net, head = transfer.build_model("resnet18", 10, "none")
                labels = torch.randint(0, 10, (len(images),))
            else:
                net, head = fcn.FCN("resnet18", 3, "fcn8s", "none"), None
                labels = torch.randint(0, 3, (len(images), size, size))
            net.to(torch.device(device))
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(images, labels), batch_size=batch_size
            )
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
            criterion = torch.nn.CrossEntropyLoss()
            arguments = (net, head, criterion, optimizer, loader, torch.device(device))
            train_epoch(model, *arguments, precision, channels_last)  # warm up (cuDNN)
            trained = train_epoch(model, *arguments, precision, channels_last)
            out[model][name] = {"train_images_per_s": round(trained["images_per_s"], 1)}
            log(f"  vision {model} {name}: {out[model][name]}")
    return out


def train_epoch(model, net, head, criterion, optimizer, loader, device, precision, channels_last):
    from rayline.vision import fcn, transfer

    if model == "transfer_resnet18":
        return transfer.train_one_epoch(
            net,
            head,
            "finetune",
            criterion,
            optimizer,
            loader,
            device,
            precision=precision,
            channels_last=channels_last,
        )
    return fcn.train_one_epoch(
        net, criterion, optimizer, loader, device, precision=precision, channels_last=channels_last
    )


def pong_part(device: str, minutes: float, workdir: str, dry_run: bool) -> dict:
    """The Pong pipeline as `rayline train` runs it, for a wall budget."""
    cores = os.cpu_count() or 2
    collectors = 1 if dry_run else max(1, cores - 2)  # a core each for the driver and replay
    overrides = {
        "run.max_wall_s": minutes * 60,
        "run.total_env_steps": 10**9,
        # The dry run is bounded by env steps (learning starts after 300, updates follow),
        # not by a wall budget a busy machine could spend on start-up alone.
        **({"run.max_wall_s": 600, "run.total_env_steps": 500} if dry_run else {}),
        "run.storage_path": f"{workdir}/results",
        "run.store_uri": f"{workdir}/store",
        "run.checkpoint_every_env_steps": 10**9,
        "collectors.num_collectors": collectors,
        "learner.device": device,
        "learner.num_gpus": 1 if device == "cuda" else 0,
        "eval.episodes": 1 if dry_run else 5,
        "eval.solved_return": None,
    }
    if dry_run:  # every part of the pipeline for a few seconds, on the CPU
        overrides |= {
            "env.num_envs_per_collector": 4,
            "replay.capacity": 20_000,
            "replay.shards": 1,
            "learner.learning_starts_env_steps": 200,
            "learner.batch_size": 32,
            "collectors.env_steps_per_call": 128,
            "collectors.num_cpus": 0.5,
            "learner.num_cpus": 0.5,
            "eval.every_env_steps": 300,
        }
    else:
        overrides |= {"collectors.num_cpus": 1, "eval.every_env_steps": 200_000}
    command = [str(Path(sys.executable).parent / "rayline"), "train", "dqn-pong"]
    if not os.environ.get("RAY_ADDRESS"):  # a Ray of its own: metrics on any free port
        command += ["--metrics-port", "0"]  # nothing scrapes it here
    for key, value in overrides.items():
        command += ["--set", f"{key}={'null' if value is None else value}"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the Pong run failed: {done.stderr[-2000:]}")
    rows = []
    for path in glob.glob(f"{workdir}/results/dqn-pong/*/result.json"):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    last = rows[-1]
    curve = sorted(
        {
            (r["eval_at_env_steps"], r["eval_at_env_steps"] * 4, r["eval_return_mean"])
            for r in rows
            if r.get("eval_at_env_steps")
        }
    )
    training = max(last["wall_s"], 1e-9)
    busy = {
        part: round(last.get(f"time_{part}_s", 0.0) / training, 3)
        for part in ("collect", "learn", "learner_replay_wait", "driver_wait")
    }
    busy["collect"] = round(busy["collect"] / collectors, 3)  # per collector
    return {
        "wall_s": round(wall, 1),
        "collectors": collectors,
        "env_steps": last["env_steps_sampled"],
        "frames": last["env_steps_sampled"] * 4,  # frame skip 4
        "learner_updates": last["learner_updates"],
        "env_steps_per_s": round(last["env_steps_sampled"] / training, 1),
        "curve": [list(point) for point in curve],
        "busy_shares": busy,
        "overrides": overrides,
    }


def predicted(device: str, overrides: dict, seconds: float) -> dict:
    """The scale model's env steps/s for this machine and the run's config
    (benchmarks/dqn_scale.py), from parts measured here in this process: one collector,
    the replay's add and sample, the learner on `device`."""
    from dqn_scale import PONG, collected_batches, collector_rate, learner_rate, pipeline_config
    from dqn_scale import predict as scale_predict
    from rayline.rl.replay import ReplayBuffer

    cfg = pipeline_config(PONG, **{k: v for k, v in overrides.items() if k != "learner.device"})
    collectors = cfg.collectors.num_collectors
    rate = collector_rate(cfg, seconds, cfg.collectors.inference)
    batches = collected_batches(cfg, 6)
    replay = ReplayBuffer(50_000, (4, 84, 84), np.uint8, frames=True, seed=0)  # a sample
    started = time.perf_counter()
    for batch in batches:
        replay.add(batch)
    t_add = (time.perf_counter() - started) / sum(len(b.actions) for b in batches)
    started, drawn = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        drawn += len(replay.sample(cfg.learner.batch_size).actions)
    t_sample = (time.perf_counter() - started) / drawn
    learner = learner_rate(cfg, device, seconds, "float32", False)["updates_per_s"]
    parts = {
        "collector_rate": rate,
        "t_add": t_add,
        "t_sample": t_sample,
        "ratio": cfg.learner.updates_per_env_step,
        "batch_size": cfg.learner.batch_size,
        "learner_updates_per_s": learner,
        "steps_per_call": cfg.collectors.env_steps_per_call,
        "t_driver_call": 0.002,  # the driver's round trip per call, as dqn_scale measures it
    }
    model = scale_predict(parts, collectors, cfg.replay.shards, os.cpu_count())
    return {
        "predicted_env_steps_per_s": round(model["env_steps_per_s"], 1),
        "bound_by": model["bound_by"],
    }


def curve_png(curve: list, path: str) -> None:
    """The learning curve (eval return against env steps) as a small PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    draw.text((margin, 4), "Pong: eval return vs env steps", fill="black")
    if curve:
        steps = [p[0] for p in curve]
        returns = [p[2] for p in curve]
        x_max, (y_min, y_max) = max(steps) or 1, (min(-21.0, *returns), max(21.0, *returns))

        def xy(step: float, value: float) -> tuple[float, float]:
            x = margin + (width - 1.5 * margin) * step / x_max
            y = height - margin - (height - 1.5 * margin) * (value - y_min) / (y_max - y_min)
            return x, y

        points = [xy(s, r) for s, r in zip(steps, returns)]
        if len(points) > 1:
            draw.line(points, fill="blue", width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="blue")
        draw.text((margin, height - margin + 4), f"0 .. {x_max:,} env steps", fill="black")
        draw.text((4, margin), f"{y_max:g}", fill="black")
        draw.text((4, height - margin - 10), f"{y_min:g}", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the JSON and the PNG")
    parser.add_argument("--pong-minutes", type=float, default=5.0)
    parser.add_argument("--dry-run", action="store_true", help="every part briefly, on the CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; nothing measured (--dry-run tries every part)")
        return
    device = "cuda" if cuda and not args.dry_run else "cpu"
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    begun = time.monotonic()
    report: dict = {"device": device_info(device), "dry_run": args.dry_run}
    sampler = GPUSampler(os.path.join(args.out, "nvidia-smi.csv"))
    try:
        log("learner ...")
        report["learner"] = learner_part(device, 0.3 if args.dry_run else 5.0, args.dry_run)
        log("vision ...")
        report["vision"] = (
            vision_part(device, steps=1, size=32, batch_size=2)
            if args.dry_run
            else vision_part(device, steps=12, size=224)
        )
        log("pong ...")
        minutes = 0.2 if args.dry_run else args.pong_minutes
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
            report["pong"] = pong_part(device, minutes, workdir, args.dry_run)
        seconds = 0.3 if args.dry_run else 3.0
        report["pong"] |= predicted(device, report["pong"].pop("overrides"), seconds)
        curve_png(report["pong"]["curve"], os.path.join(args.out, "pong_curve.png"))
    finally:
        report["gpu_samples"] = sampler.stop()
    report["seconds"] = round(time.monotonic() - begun, 1)
    Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=2))
    emit(report)


if __name__ == "__main__":
    main()
