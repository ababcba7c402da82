"""Learning quality side by side: rayline's DQN (its shipped configs, and with Rainbow's
C51 and noisy nets on) against RLlib 2.60's DQN and Stable-Baselines3's, on classic
control and MinAtar, several seeds each, reported as the field reports them (rliable's
interquartile mean with 95 % stratified bootstrap intervals).

    .venv/bin/python benchmarks/rl_suite.py [--quick] [--seeds 5]
        [--envs CartPole-v1,MinAtar/Breakout-v1] [--systems rayline,sb3]

Protocol: every run in a process of its own, one at a time, torch on 1 thread; a budget
of env steps per env (BUDGETS); a greedy evaluation of EVAL_EPISODES episodes on fresh
seeds every budget / EVAL_POINTS env steps (rayline by its own evaluator, the peers by
rayline.rl.envs.evaluate_greedy, the same episodes' code); runs go to their budget.
Systems:
- `rayline`: the shipped pipeline of the env (pipelines/dqn-*.yaml).
- `rayline-rainbow`: the same with `learner.num_atoms: 51` (C51 over the env's return
  range, RETURN_RANGE) and `network.noisy: true`.
- `sb3`: Stable-Baselines3's DQN with rl-zoo3's tuned hyper-parameters where the zoo has
  the env (CartPole, Acrobot); on MinAtar the MinAtar paper's settings (Young and Tian
  2019: RMSProp-like lr 2.5e-4, batch 32, target every 1,000 steps, replay 100k,
  epsilon 1 -> 0.1 over 100k steps) and network (3x3 conv of 16, 128 units) as SB3's
  features extractor.
- `rllib`: RLlib's DQN with its tuned CartPole example settings there, else the same
  settings with the env's network (MinAtar: the same conv as a conv filter).

Each run writes its own file under --results (default .bench/rl_suite/), so an
interrupted suite resumes where it stopped and a later `--seeds 10` adds seeds.
The last stdout line is one JSON object:
{"envs": {ENV: {SYSTEM: {"iqm", "ci95", "auc", "steps_to_target", "wall_to_target_s",
 "cpu_s", "seeds"}}}, "aggregate": {SYSTEM: {"iqm", "ci95"}},
 "budgets": {ENV: env_steps}, "random": {ENV: return}, "figure": PATH}
`iqm` is of the final evaluations; `auc` the mean evaluation return over the curve;
`steps_to_target` and `wall_to_target_s` medians over the seeds that reached TARGETS
(null when none did; `reached` counts them); the aggregate is over normalised scores
(each env scaled between the random policy's return and REFERENCE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import emit, log
from dqn_cartpole import ProcessTreeCPU, rllib_cartpole_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINATAR_PACKAGE = "minatar.gym:register_envs"
BUDGETS = {
    "CartPole-v1": 50_000,
    "Acrobot-v1": 50_000,
    "MinAtar/Breakout-v1": 150_000,
    "MinAtar/Asterix-v1": 150_000,
}
QUICK_BUDGETS = {
    "CartPole-v1": 30_000,
    "Acrobot-v1": 20_000,
    "MinAtar/Breakout-v1": 40_000,
    "MinAtar/Asterix-v1": 40_000,
}
TARGETS = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MinAtar/Breakout-v1": 5.0,
    "MinAtar/Asterix-v1": 3.0,
}
REFERENCE = {
    "CartPole-v1": 500.0,
    "Acrobot-v1": -60.0,
    "MinAtar/Breakout-v1": 15.0,
    "MinAtar/Asterix-v1": 10.0,
}
"""Normalisation's top: CartPole's maximum; Acrobot's best reported returns; roughly
the MinAtar paper's DQN after 5M frames (Breakout, Asterix)."""
RETURN_RANGE = {
    "CartPole-v1": (0.0, 100.0),  # rewards of 1, gamma 0.99: returns below 100
    "Acrobot-v1": (-100.0, 0.0),
    "MinAtar/Breakout-v1": (-1.0, 20.0),
    "MinAtar/Asterix-v1": (-1.0, 20.0),
}
PIPELINES = {
    "CartPole-v1": "dqn-cartpole.yaml",
    "Acrobot-v1": "dqn-acrobot.yaml",
    "MinAtar/Breakout-v1": "dqn-minatar-breakout.yaml",
    "MinAtar/Asterix-v1": "dqn-minatar-breakout.yaml",
}
SYSTEMS = ("rayline", "rayline-rainbow", "rllib", "sb3")
QUICK_ENVS = ("CartPole-v1", "Acrobot-v1")
QUICK_SYSTEMS = ("rayline", "sb3")
"""`--quick`'s defaults, sized to its 15 minutes on 2 cores: one seed of the quick
budgets took, rayline / rainbow / RLlib / SB3, CartPole 75 / 99 / 189 / 46 s, Acrobot
42 / 70 / 115 / 70 s, MinAtar Breakout 91 / 126 / 302 / 158 s, Asterix 89 / 125 / 286 /
141 s (2026-12-07, an AMD EPYC): all four envs and systems, 34 minutes a seed. rayline
against the fastest peer on the two classic-control envs is about 4 minutes a seed;
--envs and --systems add the rest."""
EVAL_POINTS = 10
EVAL_EPISODES = 10
EVAL_SEED = 5_000_000


def env_spec(env_id: str):
    from rayline.rl.envs import EnvSpec

    return EnvSpec(env_id, package=MINATAR_PACKAGE if env_id.startswith("MinAtar/") else "")


def evaluate(env_id: str, act, seed: int) -> float:
    from rayline.rl.envs import evaluate_greedy

    return float(np.mean(evaluate_greedy(env_spec(env_id), act, EVAL_EPISODES, seed)))


def random_return(env_id: str) -> float:
    """The uniformly random policy's mean return on the evaluation's episodes."""
    from rayline.rl.envs import describe_env

    _, _, actions = describe_env(env_spec(env_id))
    rng = np.random.default_rng(0)
    return evaluate(env_id, lambda obs: rng.integers(0, actions, len(obs)), EVAL_SEED)


# -- the peers, each run in a process of its own ------------------------------------------


ZOO_HYPERPARAMS = {
    "CartPole-v1": {
        "n_timesteps": 50_000,
        "learning_rate": 2.3e-3,
        "batch_size": 64,
        "buffer_size": 100_000,
        "learning_starts": 1000,
        "gamma": 0.99,
        "target_update_interval": 10,
        "train_freq": 256,
        "gradient_steps": 128,
        "exploration_fraction": 0.16,
        "exploration_final_eps": 0.04,
        "policy_kwargs": {"net_arch": [256, 256]},
    },
    "Acrobot-v1": {
        "n_timesteps": 100_000,
        "learning_rate": 6.3e-4,
        "batch_size": 128,
        "buffer_size": 50_000,
        "learning_starts": 0,
        "gamma": 0.99,
        "target_update_interval": 250,
        "train_freq": 4,
        "gradient_steps": -1,
        "exploration_fraction": 0.12,
        "exploration_final_eps": 0.1,
        "policy_kwargs": {"net_arch": [256, 256]},
    },
}
"""rl-zoo3 2.9's tuned DQN settings (its hyperparams/dqn.yml), copied: the zoo's package
pulls in video and hub dependencies the suite does not need."""


def minatar_extractor():
    """MinAtar's reference torso for SB3: (10, 10, C) bools -> 3x3 conv of 16 -> flat."""
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarTorso(BaseFeaturesExtractor):
        def __init__(self, observation_space):
            height, width, channels = observation_space.shape
            super().__init__(observation_space, 16 * (height - 2) * (width - 2))
            self.conv = torch.nn.Conv2d(channels, 16, 3)

        def forward(self, obs):
            return torch.relu(self.conv(obs.float().permute(0, 3, 1, 2))).flatten(1)

    return MinAtarTorso


def run_sb3(env_id: str, seed: int, budget: int, every: int) -> dict:
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    from rayline.rl.envs import load_env_package

    torch.set_num_threads(1)
    load_env_package(env_spec(env_id).package)
    zoo = ZOO_HYPERPARAMS.get(env_id)
    if zoo is not None:
        settings = {k: v for k, v in zoo.items() if k != "n_timesteps"}
        # the zoo's exploration decay, in the same absolute env steps
        settings["exploration_fraction"] = min(
            1.0, zoo["exploration_fraction"] * zoo["n_timesteps"] / budget
        )
    else:
        settings = {
            "learning_rate": 2.5e-4,
            "batch_size": 32,
            "buffer_size": 100_000,
            "learning_starts": 5000,
            "gamma": 0.99,
            "target_update_interval": 1000,
            "train_freq": 1,
            "exploration_fraction": min(1.0, 100_000 / budget),
            "exploration_final_eps": 0.1,
            "policy_kwargs": {"features_extractor_class": minatar_extractor(), "net_arch": [128]},
        }
    curve: list[list[float]] = []
    model = DQN("MlpPolicy", gym.make(env_id), seed=seed, device="cpu", verbose=0, **settings)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % every == 0:
                ret = evaluate(
                    env_id,
                    lambda obs: model.predict(obs, deterministic=True)[0],
                    EVAL_SEED + seed * 1000,
                )
                curve.append([self.num_timesteps, ret, time.time()])
                log(f"  sb3 {env_id} seed {seed}: {self.num_timesteps} steps, eval {ret:.2f}")
            return True

    model.learn(budget, callback=Evaluate())
    return {"curve": curve}


def run_rllib(env_id: str, seed: int, budget: int, every: int) -> dict:
    import gymnasium as gym
    import ray
    import torch
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    from rayline.rl.envs import load_env_package
    from rayline.testing import init_local_ray

    torch.set_num_threads(1)
    init_local_ray()
    minatar = env_id.startswith("MinAtar/")
    if minatar:

        def make_env(_config):
            load_env_package(MINATAR_PACKAGE)
            env = gym.make(env_id)  # RLlib's conv encoder wants float images
            space = gym.spaces.Box(0.0, 1.0, env.observation_space.shape, np.float32)
            return gym.wrappers.TransformObservation(env, lambda o: o.astype(np.float32), space)

        register_env("suite-env", make_env)
        model = DefaultModelConfig(conv_filters=[[16, [3, 3], 1]], head_fcnet_hiddens=[128])
        training = {
            "lr": 2.5e-4,
            "train_batch_size_per_learner": 32,
            "target_network_update_freq": 1000,
        }
        epsilon = [(0, 1.0), (min(budget, 100_000), 0.1)]
    else:
        model = rllib_cartpole_model()
        training = {"lr": 5e-4, "train_batch_size_per_learner": 32}
        epsilon = [(0, 1.0), (min(budget // 2, 25_000), 0.02)]
    config = (
        DQNConfig()
        .environment("suite-env" if minatar else env_id)
        .training(
            n_step=(2, 5),
            double_q=True,
            dueling=True,
            epsilon=epsilon,
            replay_buffer_config={
                "type": "PrioritizedEpisodeReplayBuffer",
                "capacity": 50_000,
                "alpha": 0.6,
                "beta": 0.4,
            },
            **training,
        )
        .rl_module(model_config=model)
        .debugging(seed=seed)
    )
    algo = config.build_algo()
    module = algo.get_module()
    curve: list[list[float]] = []
    next_eval, steps = every, 0

    @torch.no_grad()
    def act(obs):
        obs = torch.as_tensor(np.asarray(obs, np.float32))
        return module.forward_inference({"obs": obs})["actions"].numpy()

    while steps < budget:
        result = algo.train()
        steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        if steps >= next_eval:
            next_eval = (steps // every + 1) * every
            ret = evaluate(env_id, act, EVAL_SEED + seed * 1000)
            curve.append([steps, ret, time.time()])
            log(f"  rllib {env_id} seed {seed}: {steps} steps, eval {ret:.2f}")
    algo.stop()
    ray.shutdown()
    return {"curve": curve}


# -- rayline, through its CLI -------------------------------------------------------------


def rayline_command(system: str, env_id: str, seed: int, budget: int, every: int, workdir: str):
    rayline = os.path.join(os.path.dirname(sys.executable), "rayline")
    settings = {
        "env.id": env_id,
        "run.name": "suite",
        "run.seed": seed,
        "run.storage_path": f"{workdir}/results",
        "run.store_uri": f"{workdir}/store",
        "run.total_env_steps": budget,
        "run.max_wall_s": 24 * 3600,
        "eval.every_env_steps": every,
        "eval.episodes": EVAL_EPISODES,
        "eval.solved_return": "null",  # to the budget, as every peer
    }
    if system == "rayline-rainbow":
        v_min, v_max = RETURN_RANGE[env_id]
        settings.update(
            {
                "learner.num_atoms": 51,
                "learner.v_min": v_min,
                "learner.v_max": v_max,
                "network.noisy": "true",
            }
        )
    command = [
        rayline,
        "train",
        os.path.join(REPO, "pipelines", PIPELINES[env_id]),
        "--metrics-port",
        "0",
    ]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


def rayline_curve(workdir: str) -> list[list[float]]:
    """[env steps, mean return, unix time] of each evaluation, from Tune's results."""
    curve: dict[int, list[float]] = {}
    for path in Path(workdir, "results").glob("*/*/result.json"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            at = row.get("eval_at_env_steps")
            if at and at not in curve:
                curve[at] = [at, row["eval_return_mean"], row["timestamp"]]
    return [curve[at] for at in sorted(curve)]


# -- the suite ------------------------------------------------------------------------------


def run_file(results: Path, env_id: str, system: str, seed: int, quick: bool) -> Path:
    budget = "quick" if quick else "full"
    return results / budget / env_id.replace("/", "_") / system / f"seed{seed}.json"


def measure(system: str, env_id: str, seed: int, budget: int) -> dict:
    every = budget // EVAL_POINTS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="rl-suite-") as workdir:
        out = os.path.join(workdir, "run.json")
        if system.startswith("rayline"):
            command = rayline_command(system, env_id, seed, budget, every, workdir)
        else:
            command = [sys.executable, os.path.abspath(__file__), "--run-one", system]
            command += [
                "--envs",
                env_id,
                "--seed",
                str(seed),
                "--budget",
                str(budget),
                "--out",
                out,
            ]
        launched = time.time()
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr, cwd=REPO
        )
        tree = ProcessTreeCPU(proc.pid)
        while proc.poll() is None:
            tree.sample()
            time.sleep(tree.interval_s)
        wall = time.time() - launched
        if system.startswith("rayline"):
            curve = rayline_curve(workdir)
        else:
            curve = json.loads(Path(out).read_text())["curve"] if os.path.exists(out) else []
    target = TARGETS[env_id]
    reached = next((point for point in curve if point[1] >= target), None)
    return {
        "system": system,
        "env": env_id,
        "seed": seed,
        "budget": budget,
        "returncode": proc.returncode,
        "curve": [[int(steps), float(ret), round(at - launched, 2)] for steps, ret, at in curve],
        "final": curve[-1][1] if curve else None,
        "steps_to_target": reached[0] if reached else None,
        "wall_to_target_s": round(reached[2] - launched, 2) if reached else None,
        "wall_s": round(wall, 2),
        "cpu_s": round(tree.total, 2),
    }


def interval(
    scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> dict[str, tuple[float, list[float]]]:
    """The interquartile mean (rliable's `metrics.aggregate_iqm`) with its 95 %
    stratified bootstrap percentile interval, per system; `scores` maps a system to a
    (runs x tasks) array. The bootstrap is rliable's StratifiedBootstrap done here: each
    task's runs resampled with replacement, apart from the other tasks'. rliable 1.2's
    own (`library.get_interval_estimates`) runs on `arch`, whose 7.x fails to import
    beside pandas 3 and whose 8.x renamed the `random_state` keyword rliable passes."""
    from rliable import metrics

    rng = np.random.default_rng(seed)
    out = {}
    for system, matrix in scores.items():
        runs, tasks = matrix.shape
        draws = np.empty(reps)
        for rep in range(reps):
            picks = rng.integers(0, runs, size=(runs, tasks))
            draws[rep] = metrics.aggregate_iqm(np.take_along_axis(matrix, picks, axis=0))
        low, high = np.percentile(draws, [2.5, 97.5])
        out[system] = (float(metrics.aggregate_iqm(matrix)), [float(low), float(high)])
    return out


def curves_figure(runs: list[dict], envs: list[str], systems: list[str], path: Path) -> None:
    """One panel per env: each system's mean evaluation curve and a 95 % band (normal
    interval over the seeds at each evaluation point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(4.5 * len(envs), 3.4), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for system in systems:
            curves = [
                r["curve"]
                for r in runs
                if r["env"] == env_id and r["system"] == system and r["curve"]
            ]
            if not curves:
                continue
            points = min(len(c) for c in curves)
            steps = (
                np.array([c[i][0] for c in curves for i in range(points)])
                .reshape(len(curves), points)
                .mean(0)
            )
            returns = np.array([[c[i][1] for i in range(points)] for c in curves])
            mean = returns.mean(0)
            half = (
                1.96 * returns.std(0, ddof=1) / math.sqrt(len(curves))
                if len(curves) > 1
                else 0 * mean
            )
            ax.plot(steps, mean, label=system)
            ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy return")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def summarise(runs: list[dict], envs: list[str], systems: list[str], randoms: dict) -> dict:
    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    table: dict = {}
    normalised: dict[str, list[list[float]]] = {}
    for env_id in envs:
        finals = {}
        for system in systems:
            mine = [
                r
                for r in runs
                if r["env"] == env_id and r["system"] == system and r["final"] is not None
            ]
            if mine:
                finals[system] = np.array([[r["final"]] for r in mine])
        estimates = interval(finals) if finals else {}
        table[env_id] = {}
        for system, scores in finals.items():
            mine = [
                r
                for r in runs
                if r["env"] == env_id and r["system"] == system and r["final"] is not None
            ]
            iqm, ci = estimates[system]
            table[env_id][system] = {
                "iqm": round(iqm, 3),
                "ci95": [round(x, 3) for x in ci],
                "auc": round(
                    float(np.mean([np.mean([p[1] for p in r["curve"]]) for r in mine])), 3
                ),
                "steps_to_target": median(r["steps_to_target"] for r in mine),
                "wall_to_target_s": median(r["wall_to_target_s"] for r in mine),
                "reached": sum(r["steps_to_target"] is not None for r in mine),
                "cpu_s": median(r["cpu_s"] for r in mine),
                "wall_s": median(r["wall_s"] for r in mine),
                "seeds": len(mine),
            }
            low, high = randoms[env_id], REFERENCE[env_id]
            normalised.setdefault(system, []).append(((scores[:, 0] - low) / (high - low)).tolist())
    aggregate = {}
    complete = {
        s: columns for s, columns in normalised.items() if len(columns) == len(envs)
    }  # only systems run on every env
    if complete:
        seeds = min(len(c) for columns in complete.values() for c in columns)
        matrices = {s: np.array([c[:seeds] for c in columns]).T for s, columns in complete.items()}
        aggregate = {
            s: {"iqm": round(iqm, 3), "ci95": [round(x, 3) for x in ci]}
            for s, (iqm, ci) in interval(matrices).items()
        }
    return {"envs": table, "aggregate": aggregate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--envs", default=None, help=f"default: all ({', '.join(QUICK_ENVS)} with --quick)"
    )
    parser.add_argument(
        "--systems",
        default=None,
        help=f"default: all ({', '.join(QUICK_SYSTEMS)} with --quick)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="5, or 3 with --quick")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 seeds, shorter budgets, two envs and two systems: within 15 minutes",
    )
    parser.add_argument("--results", default=os.path.join(REPO, ".bench", "rl_suite"))
    parser.add_argument("--figure", default=None, help="PNG path (default: in --results)")
    parser.add_argument("--run-one", choices=["sb3", "rllib"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.envs is None:
        args.envs = ",".join(QUICK_ENVS if args.quick else BUDGETS)
    if args.systems is None:
        args.systems = ",".join(QUICK_SYSTEMS if args.quick else SYSTEMS)
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name, given, known in (("--envs", envs, BUDGETS), ("--systems", systems, SYSTEMS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            parser.exit(
                2,
                f"rl_suite: {name}: unknown {', '.join(unknown)} (expected: {', '.join(known)})\n",
            )
    if args.run_one:
        runner = {"sb3": run_sb3, "rllib": run_rllib}[args.run_one]
        result = runner(envs[0], args.seed, args.budget, args.budget // EVAL_POINTS)
        Path(args.out).write_text(json.dumps(result))
        return

    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    seeds = args.seeds or (3 if args.quick else 5)
    results = Path(args.results)
    randoms_file = results / "random.json"
    randoms = json.loads(randoms_file.read_text()) if randoms_file.exists() else {}
    runs = []
    for env_id in envs:
        if env_id not in randoms:
            randoms[env_id] = round(random_return(env_id), 3)
            results.mkdir(parents=True, exist_ok=True)
            randoms_file.write_text(json.dumps(randoms))
    planned = [(e, system, seed) for e in envs for system in systems for seed in range(seeds)]
    to_run = [p for p in planned if not run_file(results, *p, args.quick).exists()]
    log(f"{len(planned)} runs, {len(planned) - len(to_run)} done before, {len(to_run)} to run")
    started, number = time.time(), 0
    for env_id, system, seed in planned:
        path = run_file(results, env_id, system, seed, args.quick)
        if path.exists():
            runs.append(json.loads(path.read_text()))
            continue
        number += 1
        log(
            f"[{number}/{len(to_run)}, {time.time() - started:.0f} s] {system} {env_id} "
            f"seed {seed}: {budgets[env_id]:,} env steps ..."
        )
        run = measure(system, env_id, seed, budgets[env_id])
        log(
            f"{system} {env_id} seed {seed}: final {run['final']} in {run['wall_s']:.0f} s"
            f" (target at {run['steps_to_target']} steps, {run['wall_to_target_s']} s)"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run))
        os.replace(tmp, path)  # a half-written run never counts as done
        runs.append(run)
    log(f"{len(to_run)} runs in {time.time() - started:.0f} s")
    figure = (
        Path(args.figure)
        if args.figure
        else results / ("curves-quick.png" if args.quick else "curves.png")
    )
    curves_figure(runs, envs, systems, figure)
    summary = summarise(runs, envs, systems, randoms)
    emit(
        {
            **summary,
            "budgets": {e: budgets[e] for e in envs},
            "random": {e: randoms[e] for e in envs},
            "targets": {e: TARGETS[e] for e in envs},
            "seeds": seeds,
            "figure": str(figure),
        }
    )


if __name__ == "__main__":
    main()
