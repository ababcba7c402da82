"""The distributed DQN driver (the Ape-X shape: Horgan et al. 2018,
https://arxiv.org/abs/1803.00933) and its Ray Tune trainable.

    collectors --add--> replay actor --sample_many--> learner
        ^                                               |
        +------ policy weights via the object store ----+

Only this driver knows all three roles. It keeps every actor busy with one call in
flight, holds collectors and learner to the configured replay ratio (updates per env
step) so results do not depend on how fast each side happens to run, evaluates the
greedy policy, reports to Tune and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import torch

from rayline.config import from_dict, to_dict
from rayline.rl.collector import CollectorActor, EnvSpec, EvaluatorActor, describe_env
from rayline.rl.config import DQNConfig
from rayline.rl.dqn import epsilon_ladder
from rayline.rl.learner import LearnerActor, LearnerSettings
from rayline.rl.networks import NetworkSpec
from rayline.rl.replay import ReplayActor

# report(metrics, checkpoint_dir or None): Tune's report, or a plain callback in tests. The
# directory is deleted after the call returns, so a reporter that keeps it must copy it.
Reporter = Callable[[dict, "str | None"], None]

LEARNER_FILE = "learner.pt"
STATE_FILE = "state.json"
REPLAY_FILE = "replay.parquet"
EVALUATED_FILE = "evaluated_policy.pt"
"""The policy weights that the kept evaluation scored: what the run registers."""


@dataclasses.dataclass
class Counters:
    """Progress counters; each name carries its unit."""

    env_steps_sampled: int = 0
    learner_updates: int = 0
    target_syncs: int = 0
    weight_syncs: int = 0
    episodes_completed: int = 0
    evaluations: int = 0


class Evaluations:
    """Every greedy evaluation of the run, and the weights one of them scored: the best
    (`keep="best"`) or the latest (`keep="last"`). The learner moves on between an
    evaluation and the end of the run, so what is registered is the kept weights, never
    the learner's latest (a CartPole policy can swing from 500 to 150 in a few updates).
    `weights` are opaque here: the driver passes the object refs it evaluated."""

    def __init__(self, keep: str, solved_return: float | None, history: list | None = None):
        self.keep = keep
        self.solved_return = solved_return
        self.history: list[dict] = list(history or [])
        self.kept: dict | None = None
        """The kept evaluation's record (env_steps, return_mean, return_std, wall_s)."""
        self.kept_weights = None

    def add(self, env_steps: int, returns: list[float], wall_s: float, weights) -> dict:
        record = {
            "env_steps": env_steps,
            "return_mean": float(np.mean(returns)),
            "return_std": float(np.std(returns)),
            "wall_s": wall_s,
        }
        self.history.append(record)
        if (
            self.keep == "last"
            or self.kept is None
            or record["return_mean"] > self.kept["return_mean"]
        ):
            self.kept, self.kept_weights = record, weights
        return record

    def restore_kept(self, record: dict, weights) -> None:
        self.kept, self.kept_weights = record, weights

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def solved(self) -> bool:
        """Whether the latest evaluation reached the solved return."""
        return (
            self.solved_return is not None
            and bool(self.history)
            and self.history[-1]["return_mean"] >= self.solved_return
        )

    def metrics(self) -> dict:
        last, kept = self.last, self.kept or {}
        return {
            "eval_return_mean": last.get("return_mean", float("nan")),
            "eval_at_env_steps": last.get("env_steps", 0),
            "best_eval_return": max((h["return_mean"] for h in self.history), default=float("nan")),
            "kept_eval_return": kept.get("return_mean", float("nan")),
            "kept_eval_at_env_steps": kept.get("env_steps", 0),
        }


class PhaseTimers:
    """Seconds spent per named phase, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)


def network_spec(cfg: DQNConfig) -> tuple[EnvSpec, NetworkSpec, np.dtype]:
    env = EnvSpec(cfg.env.id, cfg.env.atari, cfg.env.max_episode_steps)
    obs_shape, obs_dtype, n_actions = describe_env(env)
    spec = NetworkSpec(
        list(obs_shape), n_actions, list(cfg.network.hidden_sizes), cfg.network.dueling
    )
    return env, spec, obs_dtype


def run_dqn(cfg: DQNConfig, report: Reporter, restore_dir: str | None = None) -> dict:
    """Train until solved or out of budget; returns the final metrics. Every report
    after a checkpoint interval, and the last one, carries a checkpoint directory."""
    started = time.monotonic()
    env, spec, obs_dtype = network_spec(cfg)
    counters = Counters()
    evaluations = Evaluations(cfg.run.register, cfg.eval.solved_return)
    if restore_dir:
        saved = json.loads(Path(restore_dir, STATE_FILE).read_text())
        counters = Counters(**saved["counters"])
        evaluations = Evaluations(cfg.run.register, cfg.eval.solved_return, saved["eval_history"])
        if saved.get("kept_evaluation") and Path(restore_dir, EVALUATED_FILE).exists():
            kept = _numpy_weights(Path(restore_dir, EVALUATED_FILE).read_bytes())
            evaluations.restore_kept(saved["kept_evaluation"], ray.put(kept))

    replay = ReplayActor.remote(
        capacity=cfg.replay.capacity,
        obs_shape=tuple(spec.obs_shape),
        obs_dtype=obs_dtype,
        prioritized=cfg.replay.prioritized,
        alpha=cfg.replay.alpha,
        seed=cfg.run.seed,
    )
    settings = LearnerSettings(
        lr=cfg.learner.lr,
        gamma=cfg.learner.gamma,
        double_q=cfg.learner.double_q,
        target_sync_every_updates=cfg.learner.target_sync_every_updates,
        tau=cfg.learner.tau,
        grad_clip_norm=cfg.learner.grad_clip_norm,
        device=cfg.learner.device,
    )
    learner = LearnerActor.options(
        num_cpus=cfg.run.learner_cpus, num_gpus=cfg.learner.num_gpus
    ).remote(
        replay,
        spec,
        settings,
        batch_size=cfg.learner.batch_size,
        beta=cfg.replay.beta,
        batches_per_fetch=cfg.learner.batches_per_fetch,
        seed=cfg.run.seed,
    )
    if restore_dir:
        ray.get(learner.load_state_bytes.remote(Path(restore_dir, LEARNER_FILE).read_bytes()))
        if os.path.exists(os.path.join(restore_dir, REPLAY_FILE)):
            ray.get(replay.restore.remote(os.path.join(restore_dir, REPLAY_FILE)))

    num_collectors, envs_each = cfg.collectors.num_collectors, cfg.env.num_envs_per_collector
    fleet = num_collectors * envs_each
    collectors = [
        CollectorActor.options(num_cpus=cfg.collectors.num_cpus).remote(
            env=env,
            network=spec,
            num_envs=envs_each,
            epsilons=[
                epsilon_ladder(
                    c * envs_each + e,
                    fleet,
                    cfg.collectors.epsilon_base,
                    cfg.collectors.epsilon_alpha,
                )
                for e in range(envs_each)
            ],
            n_step=cfg.learner.n_step,
            gamma=cfg.learner.gamma,
            epsilon_decay_env_steps=cfg.collectors.epsilon_decay_env_steps,
            seed=cfg.run.seed * 1000 + c,
        )
        for c in range(num_collectors)
    ]
    evaluator = EvaluatorActor.remote(env, spec)

    ratio = cfg.learner.updates_per_env_step
    starts = cfg.learner.learning_starts_env_steps
    warmup_transitions = max(starts, cfg.learner.batch_size)
    updates_per_call = cfg.learner.batches_per_fetch
    steps_per_call = cfg.collectors.env_steps_per_call
    timers = PhaseTimers()
    weights = ray.get(learner.weights.remote())[0]
    weights_version = counters.learner_updates
    collector_version = [-1] * num_collectors
    in_flight: dict[ray.ObjectRef, tuple[str, int]] = {}
    steps_in_flight = 0
    replay_size = ray.get(replay.size.remote())
    next_eval_at = (
        counters.env_steps_sampled // cfg.eval.every_env_steps + 1
    ) * cfg.eval.every_env_steps
    next_checkpoint_at = (
        counters.env_steps_sampled // cfg.run.checkpoint_every_env_steps + 1
    ) * cfg.run.checkpoint_every_env_steps
    last_loss = float("nan")
    recent_returns: list[float] = []
    first_env_step_unix_s: float | None = None
    last_progress = time.monotonic()
    rate_mark = (time.monotonic(), counters.env_steps_sampled, counters.learner_updates)
    stop_reason = ""

    def collector_may_start() -> bool:
        if (
            replay_size + steps_in_flight < warmup_transitions
        ):  # fresh, or resumed without a snapshot
            return True
        allowed = (
            starts
            + (counters.learner_updates + updates_per_call) / ratio
            + steps_per_call * num_collectors
        )
        return counters.env_steps_sampled + steps_in_flight + steps_per_call <= allowed

    def learner_may_start() -> bool:
        return (
            replay_size >= warmup_transitions
            and counters.learner_updates <= (counters.env_steps_sampled - starts) * ratio
        )

    def launch_collector(index: int) -> None:
        nonlocal steps_in_flight
        fresh = [weights] if collector_version[index] != weights_version else None
        collector_version[index] = weights_version
        ref = collectors[index].collect.remote(
            replay, steps_per_call, fresh, counters.env_steps_sampled
        )
        in_flight[ref] = ("collect", index)
        steps_in_flight += steps_per_call

    def launch_eval() -> None:
        ref = evaluator.evaluate.remote(
            [weights], cfg.eval.episodes, cfg.run.seed + 10_000 + counters.evaluations
        )
        # The weights go with the evaluation: they are what is registered if it is kept.
        in_flight[ref] = ("eval", (counters.env_steps_sampled, weights))

    def record_eval(env_steps: int, evaluated_weights, returns: list[float]) -> None:
        evaluations.add(env_steps, returns, time.monotonic() - started, evaluated_weights)
        counters.evaluations += 1

    def metrics() -> dict:
        return {
            **dataclasses.asdict(counters),
            **evaluations.metrics(),
            "episode_return_mean": float(np.mean(recent_returns[-100:]))
            if recent_returns
            else float("nan"),
            "loss": last_loss,
            "replay_size": replay_size,
            "solved": evaluations.solved,
            "wall_s": time.monotonic() - started,
            # wall-clock time of the first env step: start-up is launch to this
            "first_env_step_unix_s": first_env_step_unix_s or float("nan"),
            **{f"time_{phase}_s": s for phase, s in timers.seconds.items()},
        }

    def checkpoint() -> str:
        with timers.timed("checkpoint"):
            directory = tempfile.mkdtemp(prefix="rayline-dqn-ckpt-")
            state = ray.get(learner.state_bytes.remote())
            _atomic_write(os.path.join(directory, LEARNER_FILE), state)
            if cfg.replay.snapshot:
                ray.get(replay.save.remote(os.path.join(directory, REPLAY_FILE)))
            if evaluations.kept_weights is not None:
                kept = ray.get(evaluations.kept_weights)
                _atomic_write(os.path.join(directory, EVALUATED_FILE), _weights_bytes(kept))
            body = {
                "counters": dataclasses.asdict(counters),
                "eval_history": evaluations.history,
                "kept_evaluation": evaluations.kept,
                "config": to_dict(cfg),
                "network": dataclasses.asdict(spec),
            }
            _atomic_write(os.path.join(directory, STATE_FILE), json.dumps(body, indent=2).encode())
            return directory

    def report_with_checkpoint(values: dict) -> None:
        directory = checkpoint()
        try:
            report(values, directory)  # the reporter copies it (Tune into its storage)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    idle_collectors = list(range(num_collectors))
    learner_busy = False

    while True:
        if not learner_busy and learner_may_start():
            in_flight[learner.train.remote(updates_per_call)] = ("learn", 0)
            learner_busy = True
        for index in list(idle_collectors):
            if collector_may_start():
                idle_collectors.remove(index)
                launch_collector(index)
        if not in_flight:
            raise RuntimeError("DQN driver stalled: nothing in flight (rate limiter bug)")
        with timers.timed("driver_wait"):
            ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            role, index = in_flight.pop(ref)
            result = ray.get(ref)
            if role == "collect":
                if first_env_step_unix_s is None:  # when the first collect began
                    first_env_step_unix_s = time.time() - result["collect_s"]
                steps_in_flight -= steps_per_call
                counters.env_steps_sampled += result["env_steps"]
                counters.episodes_completed += len(result["episode_returns"])
                recent_returns = (recent_returns + result["episode_returns"])[-100:]
                replay_size = min(cfg.replay.capacity, replay_size + result["transitions"])
                timers.add("collect", result["collect_s"])
                idle_collectors.append(index)
            elif role == "learn":
                learner_busy = False
                counters.learner_updates = result["learner_updates"]
                counters.target_syncs = result["target_syncs"]
                last_loss = result["loss"]
                timers.add("learn", result["train_s"])
                timers.add("learner_replay_wait", result["replay_wait_s"])
                if (
                    counters.learner_updates - weights_version
                    >= cfg.collectors.weight_sync_every_updates
                ):
                    weights, weights_version = result["weights"][0], counters.learner_updates
                    counters.weight_syncs += 1
            else:  # eval
                env_steps, evaluated_weights = index
                record_eval(env_steps, evaluated_weights, result)
                report(metrics(), None)

        if counters.env_steps_sampled >= next_eval_at and not any(
            r == "eval" for r, _ in in_flight.values()
        ):
            launch_eval()
            next_eval_at += cfg.eval.every_env_steps
        if counters.env_steps_sampled >= next_checkpoint_at:
            next_checkpoint_at += cfg.run.checkpoint_every_env_steps
            report_with_checkpoint(metrics())

        now = time.monotonic()
        if now - last_progress >= cfg.run.progress_every_s:
            rate_mark = _print_progress(
                cfg.run.name, counters, rate_mark, replay_size, last_loss, evaluations.last
            )
            last_progress = now
        if evaluations.solved:
            stop_reason = (
                f"solved: mean greedy return {evaluations.last['return_mean']:.1f} "
                f">= {cfg.eval.solved_return}"
            )
        elif counters.env_steps_sampled >= cfg.run.total_env_steps:
            stop_reason = f"reached total_env_steps={cfg.run.total_env_steps:,}"
        elif now - started >= cfg.run.max_wall_s:
            stop_reason = f"reached max_wall_s={cfg.run.max_wall_s:g}"
        if stop_reason:
            break

    # An evaluation still running is waited for, not dropped; then, unless solved, the
    # learner's final weights are evaluated too.
    for ref, (role, index) in list(in_flight.items()):
        if role == "eval":
            record_eval(*index, ray.get(ref))
        elif role == "learn" and not evaluations.solved:
            result = ray.get(ref)
            weights = result["weights"][0]
            counters.learner_updates = result["learner_updates"]
            counters.target_syncs = result["target_syncs"]
    if not evaluations.solved:
        with timers.timed("eval"):
            returns = ray.get(
                evaluator.evaluate.remote([weights], cfg.eval.episodes, cfg.run.seed + 99_999)
            )
        record_eval(counters.env_steps_sampled, weights, returns)
    print(f"[{cfg.run.name}] stopped: {stop_reason}", flush=True)
    final = metrics()
    final["stop_reason"] = stop_reason
    report_with_checkpoint(final)
    for actor in [*collectors, evaluator, learner, replay]:
        ray.kill(actor)
    return final


def _print_progress(name, counters: Counters, mark, replay_size, loss, last_eval: dict) -> tuple:
    now = time.monotonic()
    elapsed = max(now - mark[0], 1e-9)
    steps_rate = (counters.env_steps_sampled - mark[1]) / elapsed
    updates_rate = (counters.learner_updates - mark[2]) / elapsed
    last_eval = f"{last_eval['return_mean']:.1f}" if last_eval else "-"
    print(
        f"[{name}] env_steps={counters.env_steps_sampled:,} ({steps_rate:,.0f}/s) "
        f"updates={counters.learner_updates:,} ({updates_rate:,.0f}/s) replay={replay_size:,} "
        f"loss={loss:.4f} eval_return={last_eval}",
        file=sys.stdout,
        flush=True,
    )
    return now, counters.env_steps_sampled, counters.learner_updates


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def dqn_trainable(config: dict) -> None:
    """Ray Tune function trainable: one DQN run per trial, resumable from its checkpoint."""
    from ray import tune

    cfg = from_dict(DQNConfig, config)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(_tune_safe(metrics), checkpoint=checkpoint)

    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else nullcontext(None) as restore_dir:
        run_dqn(cfg, report, restore_dir)


def trial_resources(cfg: DQNConfig):
    """The trial's placement group: an empty head bundle for the driver, then the
    learner's and each collector's reservations (replay and evaluator take 0 CPUs)."""
    from ray import tune

    learner = {"CPU": cfg.run.learner_cpus, "GPU": cfg.learner.num_gpus}
    bundles = [{}, learner] + [{"CPU": cfg.collectors.num_cpus}] * cfg.collectors.num_collectors
    return tune.PlacementGroupFactory([{k: v for k, v in b.items() if v} for b in bundles])


def _tune_safe(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def read_policy(checkpoint_dir: str) -> tuple[bytes, dict]:
    """The evaluated policy's state_dict bytes (the kept evaluation's weights) and the
    checkpoint's state.json, for registering."""
    path = Path(checkpoint_dir, EVALUATED_FILE)
    if not path.exists():
        raise RuntimeError(f"{checkpoint_dir}: no evaluated policy in the checkpoint")
    return path.read_bytes(), json.loads(Path(checkpoint_dir, STATE_FILE).read_text())


def _weights_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """Numpy weights (as broadcast) as torch state_dict bytes."""
    from rayline.rl.learner import state_to_bytes

    return state_to_bytes({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})


def _numpy_weights(data: bytes) -> dict[str, np.ndarray]:
    from rayline.rl.learner import state_from_bytes

    return {k: v.numpy() for k, v in state_from_bytes(data).items()}
