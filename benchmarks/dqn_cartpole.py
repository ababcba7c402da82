"""Time to solve CartPole-v1: rayline's distributed DQN against Stable-Baselines3 and
RLlib, side by side on this machine, one process per run.

Protocol (issue #3): torch limited to 1 thread for every system; a greedy evaluation of
20 episodes every 5,000 env steps (evaluation steps not counted, the same evaluation
function for every system); solved when the mean return >= 475; cap 300k env steps or
10 minutes; wall time counted from process launch to process exit (Ray start-up and
shut-down included).

    .venv/bin/python benchmarks/dqn_cartpole.py [--systems rayline,sb3,rllib] [--seeds 5]

Medians are over every run; an unsolved run counts as its whole budget (MAX_ENV_STEPS
env steps and the wall time it ran) and the number of unsolved runs is reported. CPU
seconds are summed over the run's whole process tree (Ray's GCS, raylet and worker
processes included), sampled from /proc while it runs. Start-up is from launch to the
first env step, reported apart from the wall time so that Ray's start is not read as
the algorithm's cost.

Progress goes to stderr; the last stdout line is one JSON object:
{"systems": {name: {"seeds", "solved", "unsolved", "median_env_steps", "median_wall_s",
 "median_cpu_s", "median_startup_s", "cpu_s", "startup_s", "runs"}},
 "ratios": {"wall_vs_sb3", "wall_vs_rllib", "cpu_vs_sb3", "cpu_vs_rllib"}}; rayline's
 runs also carry `registered_eval_return` (the registered policy's mean greedy return on
 20 fresh episodes, measured at registration) and `startup_phases` (launch to the first
 env step as consecutive phases: python_imports, config_checks, ray_init, tune_setup,
 trial_imports, fleet_launch, actors_start, first_weights_to_first_step; and per role
 its latest actor's spawn_s, imports_s, construct_s), whose medians rayline's summary
 carries too.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import children_of, cpu_seconds, emit, log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLVED_RETURN = 475.0
EVAL_EVERY = 5000
EVAL_EPISODES = 20
MAX_ENV_STEPS = 300_000
MAX_WALL_S = 600.0


# -- runs, each in its own process -----------------------------------------------------


def evaluate(act, seed: int) -> float:
    import numpy as np

    from rayline.rl.envs import EnvSpec, evaluate_greedy

    return float(np.mean(evaluate_greedy(EnvSpec("CartPole-v1"), act, EVAL_EPISODES, seed)))


def run_sb3(seed: int) -> dict:
    """rl-baselines3-zoo's CartPole-v1 DQN hyper-parameters (its 50k-step budget gives an
    exploration decay over 8,000 steps; the same absolute decay is kept here)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    started = time.monotonic()
    curve: list[list[float]] = []
    model = DQN(
        "MlpPolicy",
        gym.make("CartPole-v1"),
        learning_rate=2.3e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=1000,
        gamma=0.99,
        target_update_interval=10,
        train_freq=256,
        gradient_steps=128,
        exploration_fraction=0.16 * 50_000 / MAX_ENV_STEPS,
        exploration_final_eps=0.04,
        policy_kwargs={"net_arch": [256, 256]},
        seed=seed,
        device="cpu",
        verbose=0,
    )

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % EVAL_EVERY:
                return True
            mean = evaluate(
                lambda obs: model.predict(obs, deterministic=True)[0], seed + self.num_timesteps
            )
            curve.append([self.num_timesteps, mean])
            log(f"  sb3 seed {seed}: {self.num_timesteps} steps, eval {mean:.1f}")
            return mean < SOLVED_RETURN and time.monotonic() - started < MAX_WALL_S

    first_env_step_unix_s = time.time()  # learn() steps the env first
    model.learn(MAX_ENV_STEPS, callback=Evaluate())
    return {"curve": curve, "first_env_step_unix_s": first_env_step_unix_s}


def rllib_cartpole_model():
    """The network of RLlib's tuned CartPole DQN example."""
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    return DefaultModelConfig(
        fcnet_hiddens=[256],
        fcnet_activation="tanh",
        fcnet_bias_initializer="zeros_",
        head_fcnet_hiddens=[256],
        head_fcnet_bias_initializer="zeros_",
    )


def run_rllib(seed: int) -> dict:
    """RLlib's own tuned CartPole DQN example (rllib/tuned_examples/dqn/cartpole_dqn.py in
    the ray repository), with the issue's epsilon schedule 1 -> 0.02 over 25k steps."""
    import ray
    import torch
    from ray.rllib.algorithms.dqn import DQNConfig

    from rayline.testing import init_local_ray

    torch.set_num_threads(1)
    init_local_ray()
    config = (
        DQNConfig()
        .environment("CartPole-v1")
        .training(
            lr=5e-4,
            train_batch_size_per_learner=32,
            n_step=(2, 5),
            double_q=True,
            dueling=True,
            epsilon=[(0, 1.0), (25_000, 0.02)],
            replay_buffer_config={
                "type": "PrioritizedEpisodeReplayBuffer",
                "capacity": 50_000,
                "alpha": 0.6,
                "beta": 0.4,
            },
        )
        .rl_module(model_config=rllib_cartpole_model())
        .debugging(seed=seed)
    )
    algo = config.build_algo()
    module = algo.get_module()
    started = time.monotonic()
    curve: list[list[float]] = []
    next_eval = EVAL_EVERY
    steps = 0
    first_env_step_unix_s = time.time()  # train() steps the env first
    while steps < MAX_ENV_STEPS and time.monotonic() - started < MAX_WALL_S:
        result = algo.train()
        steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        if steps >= next_eval:
            next_eval = (steps // EVAL_EVERY + 1) * EVAL_EVERY

            @torch.no_grad()
            def act(obs):
                return module.forward_inference({"obs": torch.as_tensor(obs)})["actions"].numpy()

            mean = evaluate(act, seed + steps)
            curve.append([steps, mean])
            log(f"  rllib seed {seed}: {steps} steps, eval {mean:.1f}")
            if mean >= SOLVED_RETURN:
                break
    algo.stop()
    ray.shutdown()
    return {"curve": curve, "first_env_step_unix_s": first_env_step_unix_s}


def rayline_command(seed: int, workdir: str) -> list[str]:
    rayline = os.path.join(os.path.dirname(sys.executable), "rayline")
    return [
        rayline,
        "train",
        os.path.join(REPO, "pipelines", "dqn-cartpole.yaml"),
        "--metrics-port",
        "0",  # any free port: seeds may run beside other rayline commands
        "--set",
        f"run.seed={seed}",
        "--set",
        f"run.storage_path={workdir}/results",
        "--set",
        f"run.store_uri={workdir}/store",
        "--set",
        f"run.total_env_steps={MAX_ENV_STEPS}",
        "--set",
        f"run.max_wall_s={MAX_WALL_S}",
        "--set",
        f"eval.every_env_steps={EVAL_EVERY}",
        "--set",
        f"eval.episodes={EVAL_EPISODES}",
        "--set",
        f"eval.solved_return={SOLVED_RETURN}",
    ]


def rayline_curve(workdir: str) -> tuple[list[list[float]], float | None]:
    """The run's evaluation curve and the time of its first env step, from Tune's results."""
    curve, first_step = {}, None
    for path in glob.glob(f"{workdir}/results/*/*/result.json"):
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if row.get("eval_at_env_steps"):
                curve[row["eval_at_env_steps"]] = row["eval_return_mean"]
            value = row.get("first_env_step_unix_s")
            if first_step is None and isinstance(value, float) and math.isfinite(value):
                first_step = value
    return [[steps, ret] for steps, ret in sorted(curve.items())], first_step


PHASES = [
    ("python_imports", "launch", "loaded"),
    ("config_checks", "loaded", "checked"),
    ("ray_init", "checked", "ray_ready"),
    ("tune_setup", "ray_ready", "trial_process"),
    ("trial_imports", "trial_process", "trainable"),
    ("fleet_launch", "trainable", "fleet_requested"),
    ("actors_start", "fleet_requested", "actors_ready"),
    ("first_weights_to_first_step", "actors_ready", "first_env_step"),
]
"""Start-up, launch to the first env step, as consecutive phases (name, from, to)."""
ROLES = ("replay", "learner", "collector", "evaluator")


def rayline_startup(workdir: str) -> dict:
    """Where the seconds from launch to the first env step went: consecutive phases from
    the driver's marks (rayline_run.json) and the trial's (its last result), and for each
    role its latest actor's process spawn, imports and construction."""
    marks: dict = {}
    for path in glob.glob(f"{workdir}/results/*/rayline_run.json"):
        marks.update(json.loads(Path(path).read_text()).get("startup", {}))
    last: dict = {}
    for path in glob.glob(f"{workdir}/results/*/*/result.json"):
        lines = Path(path).read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    for name in ("trial_process", "trainable", "fleet_requested"):
        marks[name] = last.get(f"startup_{name}_unix_s")
    marks["first_env_step"] = last.get("first_env_step_unix_s")
    readies = [last.get(f"startup_{role}_ready_unix_s") for role in ROLES]
    marks["actors_ready"] = max((t for t in readies if t), default=None)

    def seconds(start, end):
        a, b = marks.get(start), marks.get(end)
        ok = isinstance(a, float) and isinstance(b, float) and math.isfinite(a + b)
        return round(b - a, 2) if ok else None

    phases = {name: seconds(start, end) for name, start, end in PHASES}
    roles = {}
    for role in ROLES:
        process, constructing, ready = (
            last.get(f"startup_{role}_{part}_unix_s")
            for part in ("process", "constructing", "ready")
        )
        if None not in (process, constructing, ready, marks.get("fleet_requested")):
            roles[role] = {
                "spawn_s": round(process - marks["fleet_requested"], 2),
                "imports_s": round(constructing - process, 2),
                "construct_s": round(ready - constructing, 2),
            }
    return {**phases, "roles": roles}


def rayline_registered_return(workdir: str) -> float | None:
    for path in glob.glob(f"{workdir}/store/models/*/*/metadata.json"):
        return json.loads(Path(path).read_text())["metrics"].get("registered_eval_return")
    return None


class ProcessTreeCPU:
    """CPU seconds of a process and every descendant it ever had, from /proc sampled
    every `interval_s` (a process that lives less than one interval is missed)."""

    def __init__(self, root: int, interval_s: float = 0.25):
        self.root, self.interval_s = root, interval_s
        self.seconds: dict[int, float] = {}

    def sample(self) -> None:
        for pid in children_of(self.root):
            with contextlib.suppress(OSError, IndexError, ValueError):
                self.seconds[pid] = max(self.seconds.get(pid, 0.0), cpu_seconds(pid))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# -- the side-by-side driver -----------------------------------------------------------


def measure(system: str, seed: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as workdir:
        out = os.path.join(workdir, "run.json")
        if system == "rayline":
            command = rayline_command(seed, workdir)
        else:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--run-one",
                system,
                "--seed",
                str(seed),
                "--out",
                out,
            ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        launched_unix_s, started = time.time(), time.monotonic()
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr, cwd=REPO
        )
        tree = ProcessTreeCPU(proc.pid)
        while proc.poll() is None and time.monotonic() - started < MAX_WALL_S + 180:
            tree.sample()
            time.sleep(tree.interval_s)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        registered, phases = None, None
        if system == "rayline":
            curve, first_step = rayline_curve(workdir)
            registered = rayline_registered_return(workdir)
            phases = rayline_startup(workdir)
        elif os.path.exists(out):
            ran = json.loads(Path(out).read_text())
            curve, first_step = ran["curve"], ran["first_env_step_unix_s"]
        else:
            curve, first_step = [], None
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    solved_at = next((steps for steps, ret in curve if ret >= SOLVED_RETURN), None)
    run = {
        "system": system,
        "seed": seed,
        "returncode": proc.returncode,
        "solved": solved_at is not None,
        "env_steps": solved_at,
        "wall_s": round(wall, 2),
        # reaped children are counted exactly; the sampled tree also sees daemons
        "cpu_s": round(max(reaped, tree.total), 2),
        "startup_s": round(first_step - launched_unix_s, 2) if first_step else None,
        "curve": curve,
    }
    if system == "rayline":
        run["registered_eval_return"] = registered
        run["startup_phases"] = phases
    return run


def summarise(runs: list[dict]) -> dict:
    """Medians over every run; an unsolved run counts as its whole budget."""

    def median(values) -> float | None:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    solved = [r for r in runs if r["solved"]]
    return {
        "seeds": len(runs),
        "solved": len(solved),
        "unsolved": len(runs) - len(solved),
        "median_env_steps": median(r["env_steps"] or MAX_ENV_STEPS for r in runs),
        "median_wall_s": median(r["wall_s"] for r in runs),
        "median_cpu_s": median(r["cpu_s"] for r in runs),
        "median_startup_s": median(r["startup_s"] for r in runs),
        "cpu_s": [r["cpu_s"] for r in runs],
        "startup_s": [r["startup_s"] for r in runs],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="rayline,sb3,rllib")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rllib-seeds", type=int, default=3, help="RLlib takes minutes per seed")
    parser.add_argument("--run-one", choices=["sb3", "rllib"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        result = {"sb3": run_sb3, "rllib": run_rllib}[args.run_one](args.seed)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    summary = {}
    for system in systems:
        runs = []
        for seed in range(args.rllib_seeds if system == "rllib" else args.seeds):
            log(f"{system} seed {seed} ...")
            run = measure(system, seed)
            log(
                f"{system} seed {seed}: solved={run['solved']} env_steps={run['env_steps']} wall_s={run['wall_s']}"
            )
            runs.append(run)
        summary[system] = summarise(runs)

    def ratio(peer: str, field: str = "median_wall_s"):
        """None unless every run of both ended cleanly: a peer that failed at once (not
        installed: `make bench` installs the peers) has a wall time but no comparison."""
        both = [summary.get("rayline"), summary.get(peer)]
        if not all(both) or any(r["returncode"] != 0 for s in both for r in s["runs"]):
            return None
        ours, theirs = both[0].get(field), both[1].get(field)
        return round(ours / theirs, 3) if ours and theirs else None

    ratios = {
        "wall_vs_sb3": ratio("sb3"),
        "wall_vs_rllib": ratio("rllib"),
        "cpu_vs_sb3": ratio("sb3", "median_cpu_s"),
        "cpu_vs_rllib": ratio("rllib", "median_cpu_s"),
    }
    if "rayline" in summary:
        ours = summary["rayline"]
        ours["registered_eval_return"] = [r["registered_eval_return"] for r in ours["runs"]]
        ours["startup_phases"] = {
            name: statistics.median(values) if values else None
            for name, _, _ in PHASES
            for values in [
                [
                    r["startup_phases"][name]
                    for r in ours["runs"]
                    if r["startup_phases"][name] is not None
                ]
            ]
        }
    emit({"systems": summary, "ratios": ratios})


if __name__ == "__main__":
    main()
