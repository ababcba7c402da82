"""The distributed DQN on CartPole-v1 (pipelines/dqn-cartpole.yaml) with one part killed
mid-run, against the same run unfaulted: does it recover, how fast, what is lost, does
it still solve, and what does the fault cost in wall time.

    .venv/bin/python benchmarks/faults.py [--faults collector,replay,learner,node] [--seed 0]

Each fault is its own run, in its own process: `collector`, `replay` and `learner` on a
local Ray of 2 CPUs, the process killed with SIGKILL; `node` on a three-node
`ray.cluster_utils` Ray (learner and replay on the head by a custom resource, one
collector on each of two worker nodes), one worker node removed. The moment is drawn
from --seed between 2,000 and 6,000 env steps after learning starts (1,000). Replay
snapshots every 2 s (`replay.snapshot_every_s`); the learner's state kept every 500
updates (the default). `recovery_s` is from the kill to the first report (one every
0.25 s) at which env steps and learner updates are both above their values at the kill.

Progress goes to stderr; the last stdout line is one JSON object:
{"faults": {"collector"|"replay"|"learner"|"node": {"recovery_s", "transitions_lost",
 "updates_lost", "solved", "final_eval_return", "wall_s", "unfaulted_wall_s",
 "killed_at_env_steps"}}, "unfaulted": {"solved", "wall_s", "env_steps"}}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import numpy as np

from common import emit, log, run_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTOR = {"collector": "CollectorActor", "replay": "ReplayActor", "learner": "LearnerActor"}


def actor_pid(actor_class: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(f"ray::{actor_class}".encode()):
                        return int(entry)
            except OSError:
                continue
    raise RuntimeError(f"no {actor_class} process")


def one_run(fault: str, kill_at: int, workdir: str) -> dict:
    """One CartPole run in this process; `fault` is none, collector, replay, learner or
    node."""
    import ray

    from rayline.pipelines import load_pipeline
    from rayline.rl.apex import run_dqn
    from rayline.testing import init_local_ray, local_cluster

    _, cfg = load_pipeline(os.path.join(REPO, "pipelines", "dqn-cartpole.yaml"), {})
    cfg.run.report_every_s, cfg.run.progress_every_s = 0.25, 10.0
    cfg.replay.snapshot_every_s = 2.0
    marks: dict = {}

    def report(metrics: dict, directory) -> None:
        now = time.monotonic()
        if "killed_s" not in marks and fault != "none" and metrics["env_steps_sampled"] >= kill_at:
            marks.update(
                killed_s=now,
                env_steps=metrics["env_steps_sampled"],
                updates=metrics["learner_updates"],
            )
            if fault == "node":
                cluster.remove_node(list(cluster.worker_nodes)[0], allow_graceful=False)
            else:
                os.kill(actor_pid(ACTOR[fault]), signal.SIGKILL)
        elif (
            "killed_s" in marks
            and "recovered_s" not in marks
            and metrics["env_steps_sampled"] > marks["env_steps"]
            and metrics["learner_updates"] > marks["updates"]
        ):
            marks["recovered_s"] = now

    started = time.monotonic()
    if fault == "node":
        cfg.learner.resources, cfg.replay.resources = {"head": 0.5}, {"head": 0.5}
        cfg.collectors.resources = {"collector": 1}
        worker = {"num_cpus": 1, "resources": {"collector": 1}}
        with local_cluster(1, [worker, worker], head_resources={"head": 1}) as cluster:
            result = run_dqn(cfg, report, snapshot_uri=f"{workdir}/replay.parquet")
    else:
        cluster = None
        init_local_ray()
        result = run_dqn(cfg, report, snapshot_uri=f"{workdir}/replay.parquet")
        ray.shutdown()
    recovery = marks.get("recovered_s", float("nan")) - marks.get("killed_s", float("nan"))
    return {
        "recovery_s": round(recovery, 2) if fault != "none" else None,
        "transitions_lost": result["transitions_lost"],
        "updates_lost": result["updates_lost"],
        "solved": bool(result["solved"]),
        "final_eval_return": round(float(result["eval_return_mean"]), 1),
        "wall_s": round(time.monotonic() - started, 2),
        "env_steps": result["env_steps_sampled"],
        "killed_at_env_steps": marks.get("env_steps"),
        "restarts": {
            k: result[k] for k in ("collector_restarts", "learner_restarts", "replay_restarts")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", default="collector,replay,learner,node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--one", nargs=3, metavar=("FAULT", "KILL_AT", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        emit(one_run(args.one[0], int(args.one[1]), args.one[2]))
        return

    rng = np.random.default_rng(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(REPO, "platform")}

    def run(fault: str, kill_at: int) -> dict:
        with tempfile.TemporaryDirectory(prefix="faults-") as workdir:
            argv = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                fault,
                str(kill_at),
                workdir,
            ]
            outcome = run_json(argv, env=env, timeout=900)
        log(f"  {fault}: {outcome}")
        return outcome

    log("unfaulted ...")
    unfaulted = run("none", 0)
    faults = {}
    for fault in [f for f in args.faults.split(",") if f]:
        kill_at = 1000 + int(rng.integers(2000, 6000))
        log(f"{fault}, killed at {kill_at:,} env steps ...")
        outcome = run(fault, kill_at)
        faults[fault] = {**outcome, "unfaulted_wall_s": unfaulted["wall_s"]}
    print(
        json.dumps(
            {
                "faults": faults,
                "unfaulted": {k: unfaulted[k] for k in ("solved", "wall_s", "env_steps")},
            }
        )
    )


if __name__ == "__main__":
    main()
