"""The distributed DQN driver (the Ape-X shape: Horgan et al. 2018,
https://arxiv.org/abs/1803.00933) and its Ray Tune trainable.

    collectors --add--> replay shards --sample_at--> learner
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
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch

from rayline.config import from_dict, to_dict
from rayline.fs import filesystem, write_bytes
from rayline.rl.collector import (
    FRAME_STACK,
    CollectorActor,
    EnvSpec,
    EvaluatorActor,
    describe_env,
)
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
    collector_restarts: int = 0
    replay_restarts: int = 0
    replay_snapshots: int = 0
    transitions_added: int = 0
    transitions_lost: int = 0
    """Transitions added after the replay's last snapshot by a replay that then died."""
    learner_restarts: int = 0
    updates_lost: int = 0
    """Updates made after the learner's last kept state by a learner that then died."""


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


@dataclasses.dataclass
class RateLimiter:
    """Holds collectors and learner to the replay ratio (learner updates per env step),
    so a run learns the same way on a slow laptop and a fast cluster. Collectors may run
    ahead by one call each; the learner waits for `learning_starts` env steps and for
    enough transitions to fill a batch. Plain arithmetic: tested without Ray."""

    ratio: float
    learning_starts: int
    warmup_transitions: int
    updates_per_call: int
    steps_per_call: int
    num_collectors: int
    steps_in_flight: int = 0

    def collector_may_start(self, env_steps: int, updates: int, replay_size: int) -> bool:
        if replay_size < self.warmup_transitions:
            # Fresh, resumed without a replay snapshot, or the replay was lost: refill it.
            # Steps in flight do not count: a call on a lost node may never come back,
            # and the learner waits for this refill (each collector has one call at most).
            return True
        allowed = (
            self.learning_starts
            + (updates + self.updates_per_call) / self.ratio
            + self.steps_per_call * self.num_collectors
        )
        return env_steps + self.steps_in_flight + self.steps_per_call <= allowed

    def learner_may_start(self, env_steps: int, updates: int, replay_size: int) -> bool:
        return (
            replay_size >= self.warmup_transitions
            and updates <= (env_steps - self.learning_starts) * self.ratio
        )

    def collecting(self) -> None:
        self.steps_in_flight += self.steps_per_call

    def collected(self) -> None:
        self.steps_in_flight -= self.steps_per_call


@dataclasses.dataclass
class Fleet:
    """The run's actors: the replay shards, one learner, the collectors and an evaluator.
    Collector i adds to shard i % shards."""

    replays: list[ray.actor.ActorHandle]
    learner: ray.actor.ActorHandle
    collectors: list[ray.actor.ActorHandle]
    evaluator: ray.actor.ActorHandle

    def replay_of(self, collector: int) -> ray.actor.ActorHandle:
        return self.replays[collector % len(self.replays)]

    def kill(self) -> None:
        for actor in [*self.collectors, self.evaluator, self.learner, *self.replays]:
            ray.kill(actor)


def shard_capacity(cfg: DQNConfig) -> int:
    """Each shard's capacity: replay.capacity split evenly (rounded up)."""
    return -(-cfg.replay.capacity // cfg.replay.shards)


def launch_replay(cfg: DQNConfig, spec: NetworkSpec, obs_dtype, shard: int):
    """Replay shard `shard`. Several shards are spread over the nodes, outside the trial's
    placement group (each still needs `replay.resources` where it lands)."""
    options: dict[str, Any] = {"resources": cfg.replay.resources}
    if cfg.replay.shards > 1:
        options["scheduling_strategy"] = "SPREAD"
    return ReplayActor.options(**options).remote(
        capacity=shard_capacity(cfg),
        obs_shape=tuple(spec.obs_shape),
        obs_dtype=obs_dtype,
        prioritized=cfg.replay.prioritized,
        alpha=cfg.replay.alpha,
        frames=cfg.env.atari,
        frames_per_transition=frames_per_transition(cfg),
        seed=cfg.run.seed * 1000 + shard,
    )


def frames_per_transition(cfg: DQNConfig) -> float:
    """Frames the replay holds per transition for stacked-frame envs: one new frame per
    env step, plus the frames a batch repeats from the previous one (the stack's older
    frames and the n-step window, per sub-env), plus 2 % for episode starts."""
    steps_per_env = max(cfg.collectors.env_steps_per_call // cfg.env.num_envs_per_collector, 1)
    carried = (FRAME_STACK - 1 + cfg.learner.n_step) / steps_per_env
    return (1.0 + carried) * 1.02


def launch_ready_replay(cfg: DQNConfig, spec: NetworkSpec, obs_dtype, shard: int):
    """A replacement shard, started before anyone is handed it. Ray may place it on the
    node that just died (until that node misses enough heartbeats it looks alive), where
    it would never start: then it is placed again."""
    for _ in range(10):
        replay = launch_replay(cfg, spec, obs_dtype, shard)
        try:
            ray.get(replay.__ray_ready__.remote(), timeout=30)
            return replay
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            ray.kill(replay)
    raise RuntimeError(f"replay shard {shard} could not be started on any node in 10 tries")


def shard_file(name: str, shard: int, shards: int) -> str:
    """`replay.parquet` for a single replay, `replay-1.parquet` for shard 1 of several."""
    if shards == 1:
        return name
    stem, extension = os.path.splitext(name)
    return f"{stem}-{shard}{extension}"


def alive(actor: ray.actor.ActorHandle) -> bool:
    """Whether the actor still answers (its process and node are up)."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=60)
        return True
    except ray.exceptions.RayActorError:
        return False


def launch_fleet(cfg: DQNConfig, env: EnvSpec, spec: NetworkSpec, obs_dtype) -> Fleet:
    replays = [launch_replay(cfg, spec, obs_dtype, shard) for shard in range(cfg.replay.shards)]
    learner = launch_learner(cfg, spec, replays)
    num_collectors, envs_each = cfg.collectors.num_collectors, cfg.env.num_envs_per_collector
    fleet = num_collectors * envs_each
    collectors = [
        CollectorActor.options(
            num_cpus=cfg.collectors.num_cpus, resources=cfg.collectors.resources
        ).remote(
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
            inference=cfg.collectors.inference,
            seed=cfg.run.seed * 1000 + c,
        )
        for c in range(num_collectors)
    ]
    return Fleet(replays, learner, collectors, EvaluatorActor.remote(env, spec))


def launch_learner(cfg: DQNConfig, spec: NetworkSpec, replays: list[ray.actor.ActorHandle]):
    settings = LearnerSettings(
        lr=cfg.learner.lr,
        gamma=cfg.learner.gamma,
        double_q=cfg.learner.double_q,
        target_sync_every_updates=cfg.learner.target_sync_every_updates,
        tau=cfg.learner.tau,
        grad_clip_norm=cfg.learner.grad_clip_norm,
        device=cfg.learner.device,
        precision=cfg.learner.precision,
        compile=cfg.learner.compile,
    )
    return LearnerActor.options(
        num_cpus=cfg.run.learner_cpus,
        num_gpus=cfg.learner.num_gpus,
        resources=cfg.learner.resources,
    ).remote(
        replays,
        shard_capacity(cfg),
        spec,
        settings,
        batch_size=cfg.learner.batch_size,
        beta=cfg.replay.beta,
        batches_per_fetch=cfg.learner.batches_per_fetch,
        seed=cfg.run.seed,
        threads=torch_threads(cfg.run.learner_cpus),
    )


class ReplaySnapshots:
    """Background snapshots of each replay shard every `every_s` seconds to a Parquet
    file of its own, and the rebuild of a lost shard from its latest."""

    def __init__(self, every_s: float, uri: str | None, shards: int = 1):
        self.every_s, self.shards = every_s, shards
        self.base_uri = uri or os.path.join(
            tempfile.mkdtemp(prefix="rayline-replay-"), "replay-snapshot.parquet"
        )
        self.next_at = time.monotonic() + every_s

    def uri(self, shard: int) -> str:
        return shard_file(self.base_uri, shard, self.shards)

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() >= self.next_at

    def taken(self, result: dict, state: RunState) -> None:
        self.next_at = time.monotonic() + self.every_s
        if result["taken"]:
            state.counters.replay_snapshots += 1
            state.timers.add("replay_snapshot_stall", result["stall_s"])

    def restore(self, replay: ray.actor.ActorHandle, shard: int) -> dict:
        """{"size", "added"} of the rebuilt shard: its latest snapshot's, or empty when
        none was written (a snapshot appears whole or not at all: the write is atomic,
        and one still being written died with the replay)."""
        fs, path = filesystem(self.uri(shard))
        if fs.get_file_info(path).type != pafs.FileType.File:
            return {"size": 0, "added": 0}
        return ray.get(replay.restore.remote(self.uri(shard)))


def rebuild_replay(
    cfg: DQNConfig, spec: NetworkSpec, obs_dtype, fleet: Fleet, shard: int, snapshots, state
) -> None:
    """A new replay shard from its latest snapshot, the learner pointed at it (collectors
    get the handle with each call); transitions added since the snapshot are counted."""
    counters = state.counters
    fleet.replays[shard] = launch_ready_replay(cfg, spec, obs_dtype, shard)
    recovered = snapshots.restore(fleet.replays[shard], shard)
    lost = max(state.shard_added[shard] - recovered["added"], 0)
    counters.replay_restarts += 1
    counters.transitions_lost += lost
    counters.transitions_added -= lost
    state.shard_added[shard] = recovered["added"]
    state.shard_sizes[shard] = recovered["size"]
    ray.get(fleet.learner.use_replay.remote(fleet.replays))
    named = f"replay shard {shard}" if cfg.replay.shards > 1 else "replay"
    print(
        f"[{cfg.run.name}] {named} lost: rebuilt from its snapshot with "
        f"{recovered['size']:,} transitions ({lost:,} transitions lost)",
        flush=True,
    )


def rebuild_learner(
    cfg: DQNConfig, spec: NetworkSpec, fleet: Fleet, keeper: LearnerKeeper, counters: Counters
) -> int:
    """A new learner actor from the latest kept state; its update count. The collectors
    go on meanwhile; the updates since the kept state are counted as lost."""
    fleet.learner, restored = keeper.rebuild(cfg, spec, fleet.replays)
    keeper.keep(fleet.learner, restored)
    lost = max(counters.learner_updates - restored, 0)
    counters.learner_restarts += 1
    counters.updates_lost += lost
    counters.learner_updates = restored
    print(
        f"[{cfg.run.name}] learner lost: rebuilt from its state at {restored:,} "
        f"updates ({lost:,} updates lost)",
        flush=True,
    )
    return restored


class LearnerKeeper:
    """The learner's whole state (policy, target, optimiser, update counters), kept in the
    object store every `learner.state_every_updates` updates and owned by the driver, so
    a learner whose process dies is rebuilt in the run from the latest one. The two
    latest are kept: the newest may still have been inside the learner when it died."""

    def __init__(self, every_updates: int):
        self.every = every_updates
        self.kept: list[tuple[ray.ObjectRef, int]] = []
        self.next_at = 0

    def keep(self, learner: ray.actor.ActorHandle, updates: int) -> None:
        self.kept = [*self.kept, (learner.state_bytes.remote(), updates)][-2:]
        self.next_at = updates + self.every

    def maybe_keep(self, learner: ray.actor.ActorHandle, updates: int) -> None:
        if updates >= self.next_at:
            self.keep(learner, updates)

    def rebuild(self, cfg: DQNConfig, spec: NetworkSpec, replays: list[ray.actor.ActorHandle]):
        """A new learner with the latest state that survived; (learner, its updates)."""
        learner = launch_learner(cfg, spec, replays)
        for state, _ in reversed(self.kept):
            try:
                return learner, ray.get(learner.load_state_bytes.remote(state), timeout=600)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    "the learner could not be rebuilt in 10 minutes: no node has the "
                    "resources it needs (learner.num_gpus, run.learner_cpus, learner.resources)"
                ) from None
            except ray.exceptions.RayError:  # that state was lost with the learner
                continue
        return learner, 0


def torch_threads(cpus: float) -> int:
    """torch threads for a worker that reserved `cpus`: one per whole CPU, at least one
    (2 threads on 2 busy cores made a learner 5x slower)."""
    return max(1, int(cpus))


@dataclasses.dataclass
class RunState:
    """What the driver knows between calls: counters, evaluations, the latest weights
    and the figures the next report carries."""

    counters: Counters
    evaluations: Evaluations
    started: float
    timers: PhaseTimers = dataclasses.field(default_factory=PhaseTimers)
    shard_sizes: list[int] = dataclasses.field(default_factory=lambda: [0])
    shard_added: list[int] = dataclasses.field(default_factory=lambda: [0])
    last_loss: float = float("nan")
    recent_returns: list[float] = dataclasses.field(default_factory=list)
    first_env_step_unix_s: float | None = None

    @property
    def replay_size(self) -> int:
        return sum(self.shard_sizes)

    def metrics(self) -> dict:
        c, e = self.counters, self.evaluations
        return {
            **dataclasses.asdict(c),
            # Tune's step: TensorBoard's x-axis is env steps, not report count.
            "timesteps_total": c.env_steps_sampled,
            **e.metrics(),
            "episode_return_mean": float(np.mean(self.recent_returns))
            if self.recent_returns
            else float("nan"),
            "loss": self.last_loss,
            "replay_size": self.replay_size,
            "solved": e.solved,
            "wall_s": time.monotonic() - self.started,
            "env_steps_per_s": c.env_steps_sampled / max(time.monotonic() - self.started, 1e-9),
            "updates_per_s": c.learner_updates / max(time.monotonic() - self.started, 1e-9),
            # wall-clock time of the first env step: start-up is launch to this
            "first_env_step_unix_s": self.first_env_step_unix_s or float("nan"),
            **{f"time_{phase}_s": s for phase, s in self.timers.seconds.items()},
        }

    def collected(self, result: dict, shard: int, capacity: int) -> None:
        if self.first_env_step_unix_s is None:  # when the first collect began
            self.first_env_step_unix_s = time.time() - result["collect_s"]
        self.counters.env_steps_sampled += result["env_steps"]
        self.counters.episodes_completed += len(result["episode_returns"])
        self.recent_returns = (self.recent_returns + result["episode_returns"])[-100:]
        self.shard_sizes[shard] = min(capacity, self.shard_sizes[shard] + result["transitions"])
        self.shard_added[shard] += result["transitions"]
        self.counters.transitions_added += result["transitions"]
        self.timers.add("collect", result["collect_s"])

    def learned(self, result: dict) -> None:
        self.counters.learner_updates = result["learner_updates"]
        self.counters.target_syncs = result["target_syncs"]
        self.last_loss = result["loss"]
        self.timers.add("learn", result["train_s"])
        self.timers.add("learner_replay_wait", result["replay_wait_s"])

    def evaluated(self, env_steps: int, weights, returns: list[float]) -> None:
        self.evaluations.add(env_steps, returns, time.monotonic() - self.started, weights)
        self.counters.evaluations += 1


def write_checkpoint(cfg: DQNConfig, spec: NetworkSpec, fleet: Fleet, state: RunState) -> str:
    """A new directory with the learner, the kept evaluation's weights, the counters,
    the evaluation history and the config (and the replay, with `replay.snapshot`)."""
    directory = tempfile.mkdtemp(prefix="rayline-dqn-ckpt-")
    write_bytes(os.path.join(directory, LEARNER_FILE), ray.get(fleet.learner.state_bytes.remote()))
    if cfg.replay.snapshot:
        shards = len(fleet.replays)
        ray.get(
            [
                replay.save.remote(os.path.join(directory, shard_file(REPLAY_FILE, i, shards)))
                for i, replay in enumerate(fleet.replays)
            ]
        )
    evaluations = state.evaluations
    if evaluations.kept_weights is not None:
        kept = ray.get(evaluations.kept_weights)
        write_bytes(os.path.join(directory, EVALUATED_FILE), _weights_bytes(kept))
    body = {
        "counters": dataclasses.asdict(state.counters),
        "eval_history": evaluations.history,
        "kept_evaluation": evaluations.kept,
        "config": to_dict(cfg),
        "network": dataclasses.asdict(spec),
    }
    write_bytes(os.path.join(directory, STATE_FILE), json.dumps(body, indent=2).encode())
    return directory


def restore(cfg: DQNConfig, restore_dir: str, fleet: Fleet, state: RunState) -> None:
    """Counters, evaluations (with the kept weights), learner and replay snapshot from a
    checkpoint directory."""
    saved = json.loads(Path(restore_dir, STATE_FILE).read_text())
    state.counters = Counters(**saved["counters"])
    state.evaluations = Evaluations(cfg.run.register, cfg.eval.solved_return, saved["eval_history"])
    if saved.get("kept_evaluation") and Path(restore_dir, EVALUATED_FILE).exists():
        kept = _numpy_weights(Path(restore_dir, EVALUATED_FILE).read_bytes())
        state.evaluations.restore_kept(saved["kept_evaluation"], ray.put(kept))
    ray.get(fleet.learner.load_state_bytes.remote(Path(restore_dir, LEARNER_FILE).read_bytes()))
    shards = len(fleet.replays)
    for shard, replay in enumerate(fleet.replays):
        path = os.path.join(restore_dir, shard_file(REPLAY_FILE, shard, shards))
        if os.path.exists(path):
            recovered = ray.get(replay.restore.remote(path))
            state.shard_sizes[shard] = recovered["size"]
            state.shard_added[shard] = recovered["added"]


def stop_reason(cfg: DQNConfig, state: RunState) -> str:
    """Why the run stops now, or "" to go on."""
    if state.evaluations.solved:
        return (
            f"solved: mean greedy return {state.evaluations.last['return_mean']:.1f} "
            f">= {cfg.eval.solved_return}"
        )
    if state.counters.env_steps_sampled >= cfg.run.total_env_steps:
        return f"reached total_env_steps={cfg.run.total_env_steps:,}"
    if time.monotonic() - state.started >= cfg.run.max_wall_s:
        return f"reached max_wall_s={cfg.run.max_wall_s:g}"
    return ""


def next_multiple(value: int, every: int) -> int:
    return (value // every + 1) * every


def run_dqn(
    cfg: DQNConfig,
    report: Reporter,
    restore_dir: str | None = None,
    snapshot_uri: str | None = None,
) -> dict:
    """Train until solved or out of budget; returns the final metrics. Every report
    after a checkpoint interval, and the last one, carries a checkpoint directory.

    The loop: launch what the rate limiter allows (learner updates, collector calls, an
    evaluation when due), wait for one result, account for it, checkpoint when due,
    stop when solved or out of budget. Every actor has at most one call in flight."""
    env, spec, obs_dtype = network_spec(cfg)
    shards = cfg.replay.shards
    state = RunState(
        Counters(),
        Evaluations(cfg.run.register, cfg.eval.solved_return),
        time.monotonic(),
        shard_sizes=[0] * shards,
        shard_added=[0] * shards,
    )
    fleet = launch_fleet(cfg, env, spec, obs_dtype)
    if restore_dir:
        restore(cfg, restore_dir, fleet, state)
    snapshots = ReplaySnapshots(cfg.replay.snapshot_every_s, snapshot_uri, shards)
    counters, limiter = (
        state.counters,
        RateLimiter(
            ratio=cfg.learner.updates_per_env_step,
            learning_starts=cfg.learner.learning_starts_env_steps,
            warmup_transitions=max(cfg.learner.learning_starts_env_steps, cfg.learner.batch_size),
            updates_per_call=cfg.learner.batches_per_fetch,
            steps_per_call=cfg.collectors.env_steps_per_call,
            num_collectors=cfg.collectors.num_collectors,
        ),
    )
    # Policy weights as published (a ref the driver owns: it outlives the learner), the
    # updates they are from, and a serial number collectors compare with their own.
    weights = fleet.learner.weights.remote()
    weights_version, weights_serial = counters.learner_updates, 0
    keeper = LearnerKeeper(cfg.learner.state_every_updates)
    keeper.keep(fleet.learner, counters.learner_updates)  # the fresh or restored learner
    collector_version = [-1] * len(fleet.collectors)
    collector_incarnation: list[str | None] = [None] * len(fleet.collectors)
    idle_collectors, learner_busy = list(range(len(fleet.collectors))), False
    in_flight: dict[ray.ObjectRef, tuple[str, Any]] = {}
    # Rebuilding the learner or the replay starts a new epoch: a call launched before it
    # that fails met what was lost, and is done again.
    fleet_epoch, launched_in = 0, {}
    next_eval_at = next_multiple(counters.env_steps_sampled, cfg.eval.every_env_steps)
    next_checkpoint_at = next_multiple(
        counters.env_steps_sampled, cfg.run.checkpoint_every_env_steps
    )
    progress = Progress(cfg.run.name, cfg.run.progress_every_s, counters)
    next_report_at = time.monotonic() + cfg.run.report_every_s

    def report_with_checkpoint(values: dict) -> None:
        with state.timers.timed("checkpoint"):
            directory = write_checkpoint(cfg, spec, fleet, state)
        try:
            report(values, directory)  # the reporter copies it (Tune into its storage)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def account_collect(index: int, result: dict) -> None:
        if collector_incarnation[index] not in (None, result["incarnation"]):
            counters.collector_restarts += 1  # Ray restarted it: a new process
        collector_incarnation[index] = result["incarnation"]
        if result.get("needs_weights"):
            collector_version[index] = -1  # its next call carries the current weights
        else:
            state.collected(result, index % shards, shard_capacity(cfg))

    while True:
        # launch
        sizes = (counters.env_steps_sampled, counters.learner_updates, state.replay_size)
        if not learner_busy and limiter.learner_may_start(*sizes):
            stats, fresh_weights = fleet.learner.train.remote(limiter.updates_per_call)
            in_flight[stats] = ("learn", fresh_weights)
            launched_in[stats] = fleet_epoch
            learner_busy = True
        for index in list(idle_collectors):
            sizes = (counters.env_steps_sampled, counters.learner_updates, state.replay_size)
            if limiter.collector_may_start(*sizes):
                idle_collectors.remove(index)
                fresh = [weights] if collector_version[index] != weights_serial else None
                collector_version[index] = weights_serial
                ref = fleet.collectors[index].collect.remote(
                    fleet.replay_of(index),
                    limiter.steps_per_call,
                    fresh,
                    counters.env_steps_sampled,
                )
                in_flight[ref] = ("collect", index)
                launched_in[ref] = fleet_epoch
                limiter.collecting()
        if counters.env_steps_sampled >= next_eval_at and not any(
            role == "eval" for role, _ in in_flight.values()
        ):
            seed = cfg.run.seed + 10_000 + counters.evaluations
            ref = fleet.evaluator.evaluate.remote([weights], cfg.eval.episodes, seed)
            # The weights go with the evaluation: they are what is registered if kept.
            in_flight[ref] = ("eval", (counters.env_steps_sampled, weights))
            launched_in[ref] = fleet_epoch
            next_eval_at += cfg.eval.every_env_steps
        if snapshots.due() and not any(role == "snapshot" for role, _ in in_flight.values()):
            for shard, replay in enumerate(fleet.replays):
                ref = replay.snapshot.remote(snapshots.uri(shard))
                in_flight[ref], launched_in[ref] = ("snapshot", shard), fleet_epoch
        if not in_flight:
            raise RuntimeError("DQN driver stalled: nothing in flight (rate limiter bug)")
        # wait
        with state.timers.timed("driver_wait"):
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        # account
        role, tag = in_flight.pop(ref)
        epoch = launched_in.pop(ref, fleet_epoch)
        try:
            result = ray.get(ref)
            # A collector's add found the replay gone (this call's or its previous one's).
            failed = role == "collect" and result.get("replay_lost", False)
        except ray.exceptions.RayError:
            failed = True
        if failed and epoch == fleet_epoch:
            # Who died? A learner or replay lost (process or node) is rebuilt in the run.
            learner_lost = not alive(fleet.learner)
            lost_shards = [i for i, replay in enumerate(fleet.replays) if not alive(replay)]
            replay_lost = bool(lost_shards)
            if learner_lost:
                restored = rebuild_learner(cfg, spec, fleet, keeper, counters)
                weights, weights_version = fleet.learner.weights.remote(), restored
                weights_serial += 1
            for shard in lost_shards:
                rebuild_replay(cfg, spec, obs_dtype, fleet, shard, snapshots, state)
            if not (learner_lost or replay_lost):
                if role == "collect":
                    failed = False  # an earlier add met a replay since replaced
                else:
                    ray.get(ref)  # a failure of its own: raise it
            else:
                fleet_epoch += 1
        if failed:  # the call met a dead learner or replay: it did not happen
            if role == "collect":
                limiter.collected()
                collector_version[tag] = -1  # the weights it was sent may be lost
                idle_collectors.append(tag)
            elif role == "learn":
                learner_busy = False
            elif role == "eval":
                next_eval_at = min(next_eval_at, tag[0])  # evaluate again
            continue
        if role == "snapshot":
            snapshots.taken(result, state)
        elif role == "collect":
            limiter.collected()
            account_collect(tag, result)
            idle_collectors.append(tag)
        elif role == "learn":
            learner_busy = False
            state.learned(result)
            keeper.maybe_keep(fleet.learner, counters.learner_updates)
            if (
                counters.learner_updates - weights_version
                >= cfg.collectors.weight_sync_every_updates
            ):
                weights, weights_version = tag, counters.learner_updates
                weights_serial += 1
                counters.weight_syncs += 1
        else:
            state.evaluated(*tag, result)
            report(state.metrics(), None)
        # checkpoint
        if counters.env_steps_sampled >= next_checkpoint_at:
            next_checkpoint_at += cfg.run.checkpoint_every_env_steps
            report_with_checkpoint(state.metrics())
        elif time.monotonic() >= next_report_at:  # training curves between evaluations
            report(state.metrics(), None)
        if time.monotonic() >= next_report_at:
            next_report_at = time.monotonic() + cfg.run.report_every_s
        progress.maybe_print(state)
        # stop
        reason = stop_reason(cfg, state)
        if reason:
            break

    # Collector calls still running finish and are counted, so the final figures and the
    # checkpointed replay agree (a collector Ray is restarting answers once it is back,
    # in seconds); one that has nowhere to restart (its node gone) is not waited for.
    collecting = [ref for ref, (role, _) in in_flight.items() if role == "collect"]
    finished, _ = ray.wait(collecting, num_returns=len(collecting), timeout=15)
    for ref in finished:
        _, index = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError:
            continue
        if not result.get("replay_lost", False):
            account_collect(index, result)
    # An evaluation still running is waited for, not dropped; then, unless solved, the
    # learner's final weights are evaluated too.
    for ref, (role, tag) in list(in_flight.items()):
        if role == "eval":
            state.evaluated(*tag, ray.get(ref))
        elif role == "learn" and not state.evaluations.solved:
            state.learned(ray.get(ref))
            weights = tag
    if not state.evaluations.solved:
        with state.timers.timed("eval"):
            seed = cfg.run.seed + 99_999
            returns = ray.get(fleet.evaluator.evaluate.remote([weights], cfg.eval.episodes, seed))
        state.evaluated(counters.env_steps_sampled, weights, returns)
    print(f"[{cfg.run.name}] stopped: {reason}", flush=True)
    final = {**state.metrics(), "stop_reason": reason}
    report_with_checkpoint(final)
    fleet.kill()
    return final


class Progress:
    """One line every `every_s` seconds: env steps and updates with their rates, the
    replay's size, the loss and the latest evaluation."""

    def __init__(self, name: str, every_s: float, counters: Counters):
        self.name, self.every_s = name, every_s
        self.mark = (time.monotonic(), counters.env_steps_sampled, counters.learner_updates)

    def maybe_print(self, state: RunState) -> None:
        now = time.monotonic()
        if now - self.mark[0] < self.every_s:
            return
        c = state.counters
        elapsed = max(now - self.mark[0], 1e-9)
        steps_rate = (c.env_steps_sampled - self.mark[1]) / elapsed
        updates_rate = (c.learner_updates - self.mark[2]) / elapsed
        last = state.evaluations.last
        shown = f"{last['return_mean']:.1f}" if last else "-"
        print(
            f"[{self.name}] env_steps={c.env_steps_sampled:,} ({steps_rate:,.0f}/s) "
            f"updates={c.learner_updates:,} ({updates_rate:,.0f}/s) "
            f"replay={state.replay_size:,} loss={state.last_loss:.4f} eval_return={shown}",
            file=sys.stdout,
            flush=True,
        )
        self.mark = (now, c.env_steps_sampled, c.learner_updates)


def dqn_trainable(config: dict) -> None:
    """Ray Tune function trainable: one DQN run per trial, resumable from its checkpoint."""
    from ray import tune

    cfg = from_dict(DQNConfig, config)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(_tune_safe(metrics), checkpoint=checkpoint)

    context = tune.get_context()
    folder = cfg.replay.snapshot_dir or context.get_trial_dir()
    snapshot_uri = f"{folder.rstrip('/')}/replay-{context.get_trial_id()}.parquet"
    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else nullcontext(None) as restore_dir:
        run_dqn(cfg, report, restore_dir, snapshot_uri)


def trial_resources(cfg: DQNConfig):
    """The trial's placement group: a head bundle for the driver, the replay and the
    evaluator (0 CPUs; the replay's custom resources, if any), then the learner's and
    each collector's reservations."""
    from ray import tune

    learner = {"CPU": cfg.run.learner_cpus, "GPU": cfg.learner.num_gpus, **cfg.learner.resources}
    collector = {"CPU": cfg.collectors.num_cpus, **cfg.collectors.resources}
    # Several shards are spread outside the group (launch_replay); one lives in the head's.
    head = dict(cfg.replay.resources) if cfg.replay.shards == 1 else {}
    bundles = [head, learner] + [collector] * cfg.collectors.num_collectors
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
