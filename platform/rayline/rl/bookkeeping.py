"""What the DQN run loop (rayline.rl.apex) knows between calls: progress counters, the
evaluations and the weights one of them scored, time per phase, the figures each report
carries, the console line, and when to stop. `RunState` owns them: the run loop, the
fleet's rebuilds and a restored checkpoint report what happened, and only its methods
change counters or say a console line. Plain Python: tested without Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import ray

from rayline.rl.collector import Collected
from rayline.rl.config import DQNConfig
from rayline.rl.learner_actor import Learned
from rayline.rl.replay import Restored, Snapshot


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
    `weights` are opaque here: the run loop passes the object refs it evaluated.

    A run is solved only when confirmed: an evaluation that reaches the solved return is
    played again with the same weights on fresh seeds (`confirm`), and only if that holds
    too is the run solved, with those weights kept. One lucky set of episodes (a CartPole
    policy at 485 on 20 episodes, 474 on the next 20) does not end a run. "Holds" is a
    lower bound: the confirmation's mean less `confirm_z` standard errors, so that a
    policy whose episodes spread widely around the solved return must play on."""

    def __init__(
        self,
        keep: str,
        solved_return: float | None,
        history: list | None = None,
        confirm_z: float = 2.0,
    ):
        self.keep = keep
        self.solved_return = solved_return
        self.confirm_z = confirm_z
        self.history: list[dict] = list(history or [])
        self.kept: dict | None = None
        """The kept evaluation's record (env_steps, return_mean, return_std, wall_s)."""
        self.kept_weights = None
        self.confirmed: dict | None = None
        """The evaluation whose confirmation held: the run is solved."""
        self.confirmations = 0

    def reaches_solved(self, record: dict) -> bool:
        """Whether an evaluation's record is worth confirming."""
        return self.solved_return is not None and record["return_mean"] >= self.solved_return

    def confirm(self, record: dict, returns: list[float], weights) -> bool:
        """The same weights' returns on fresh seeds: whether the run is solved. A
        confirmed evaluation's weights are the kept ones (what is registered)."""
        self.confirmations += 1
        record["confirmed_return_mean"] = float(np.mean(returns))
        record["confirmed_episodes"] = len(returns)
        standard_error = (
            float(np.std(returns, ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else 0.0
        )
        record["confirmed_lower_bound"] = (
            record["confirmed_return_mean"] - self.confirm_z * standard_error
        )
        if self.solved_return is None or record["confirmed_lower_bound"] < self.solved_return:
            return False
        self.confirmed = record
        self.kept, self.kept_weights = record, held(weights)
        return True

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
            self.kept, self.kept_weights = record, held(weights)
        return record

    def restore_kept(self, record: dict, weights) -> None:
        self.kept, self.kept_weights = record, held(weights)

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def solved(self) -> bool:
        """Whether an evaluation reached the solved return and its confirmation held."""
        return self.confirmed is not None

    def metrics(self) -> dict:
        last, kept = self.last, self.kept or {}
        return {
            "eval_return_mean": last.get("return_mean", float("nan")),
            "eval_at_env_steps": last.get("env_steps", 0),
            "best_eval_return": max((h["return_mean"] for h in self.history), default=float("nan")),
            "kept_eval_return": kept.get("return_mean", float("nan")),
            "kept_eval_at_env_steps": kept.get("env_steps", 0),
            "confirmations": self.confirmations,
            "confirmed_return_mean": (self.confirmed or {}).get(
                "confirmed_return_mean", float("nan")
            ),
            "confirmed_lower_bound": (self.confirmed or {}).get(
                "confirmed_lower_bound", float("nan")
            ),
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


@dataclasses.dataclass
class RunState:
    """What the run loop knows between calls: counters, evaluations, the latest weights
    and the figures the next report carries."""

    counters: Counters
    evaluations: Evaluations
    started: float
    timers: PhaseTimers = dataclasses.field(default_factory=PhaseTimers)
    shard_sizes: list[int] = dataclasses.field(default_factory=lambda: [0])
    shard_added: list[int] = dataclasses.field(default_factory=lambda: [0])
    last_loss: float = float("nan")
    recent_returns: list[float] = dataclasses.field(default_factory=list)
    console: list[str] = dataclasses.field(default_factory=list)
    """Lines for the user's console, not yet reported: the next report carries them
    (rayline.family.CONSOLE_KEY), and the driver of the run prints them."""
    first_env_step_unix_s: float | None = None
    incarnations: dict[int, str] = dataclasses.field(default_factory=dict)
    """Collector index -> the process that answered its last call."""

    def say(self, line: str) -> None:
        self.console.append(line)

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

    def collected(self, result: Collected, shard: int, capacity: int) -> None:
        if self.first_env_step_unix_s is None:  # when the first collect began
            self.first_env_step_unix_s = time.time() - result.collect_s
        self.counters.env_steps_sampled += result.env_steps
        self.counters.episodes_completed += len(result.episode_returns)
        self.recent_returns = [*self.recent_returns, *result.episode_returns][-100:]
        self.shard_sizes[shard] = min(capacity, self.shard_sizes[shard] + result.transitions)
        self.shard_added[shard] += result.transitions
        self.counters.transitions_added += result.transitions
        self.timers.add("collect", result.collect_s)

    def learned(self, result: Learned) -> None:
        self.counters.learner_updates = result.learner_updates
        self.counters.target_syncs = result.target_syncs
        self.last_loss = result.loss
        self.timers.add("learn", result.train_s)
        self.timers.add("learner_replay_wait", result.replay_wait_s)

    def evaluated(self, env_steps: int, weights, returns: list[float]) -> dict:
        self.counters.evaluations += 1
        return self.evaluations.add(env_steps, returns, time.monotonic() - self.started, weights)

    def confirmed(self, env_steps: int, record: dict, returns: list[float], weights) -> None:
        """A confirmation's returns: the run solved, or a line saying why not."""
        if not self.evaluations.confirm(record, returns, weights):
            self.say(
                f"evaluation at {env_steps:,} env steps not confirmed: "
                f"{record['return_mean']:.1f}, then {np.mean(returns):.1f} on "
                f"{len(returns)} fresh episodes (lower bound "
                f"{record['confirmed_lower_bound']:.1f}); going on"
            )

    def collector_answered(self, index: int, incarnation: str) -> None:
        """A collector's call came back from `incarnation` (its process): another than
        the last one's means Ray restarted it."""
        if self.incarnations.get(index, incarnation) != incarnation:
            self.counters.collector_restarts += 1
        self.incarnations[index] = incarnation

    def weights_synced(self) -> None:
        self.counters.weight_syncs += 1

    def snapshot_taken(self, result: Snapshot) -> None:
        if result.taken:
            self.counters.replay_snapshots += 1
            self.timers.add("replay_snapshot_stall", result.stall_s)

    def hung_killed(self, names: list[str], timeout_s: float) -> None:
        for name in names:
            self.say(f"{name} did not answer a ping in {timeout_s:g} s: killed")

    def replay_rebuilt(self, shard: int, recovered: Restored, named: bool) -> None:
        """A lost replay shard rebuilt from its latest snapshot: what was added since is
        counted as lost. `named`: the run has several shards."""
        lost = max(self.shard_added[shard] - recovered.added, 0)
        self.counters.replay_restarts += 1
        self.counters.transitions_lost += lost
        self.counters.transitions_added -= lost
        self.shard_added[shard] = recovered.added
        self.shard_sizes[shard] = recovered.size
        self.say(
            f"{f'replay shard {shard}' if named else 'replay'} lost: rebuilt from its snapshot "
            f"with {recovered.size:,} transitions ({lost:,} transitions lost)"
        )

    def learner_rebuilt(self, restored_updates: int) -> None:
        """A lost learner rebuilt from its state at `restored_updates`: the updates since
        are counted as lost."""
        counters = self.counters
        lost = max(counters.learner_updates - restored_updates, 0)
        counters.learner_restarts += 1
        counters.updates_lost += lost
        counters.learner_updates = restored_updates
        self.say(
            f"learner lost: rebuilt from its state at {restored_updates:,} updates "
            f"({lost:,} updates lost)"
        )

    def restored(self, saved: Saved) -> None:
        """The state a checkpoint held (rayline.rl.checkpoint.restore)."""
        self.counters, self.evaluations = saved.counters, saved.evaluations
        for shard, recovered in saved.shards.items():
            self.shard_sizes[shard] = recovered.size
            self.shard_added[shard] = recovered.added


@dataclasses.dataclass
class Saved:
    """What a run's checkpoint gives back: its counters, its evaluations (the kept
    weights with them) and each replay shard restored from it."""

    counters: Counters
    evaluations: Evaluations
    shards: dict[int, Restored]


def held(weights):
    """Weights to keep, as values in this process: they arrive as an object ref, and are
    fetched when kept, while every host that holds a copy is up. Fetched later (at a
    checkpoint after a host was lost), Ray's pull tried the lost host's copy first and
    stalled for 48 s."""
    return ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights


def stop_reason(cfg: DQNConfig, state: RunState) -> str:
    """Why the run stops now, or "" to go on."""
    confirmed = state.evaluations.confirmed
    if confirmed:
        return (
            f"solved: mean greedy return {confirmed['return_mean']:.1f}, then "
            f"{confirmed['confirmed_return_mean']:.1f} on {confirmed['confirmed_episodes']} "
            f"fresh episodes, >= {cfg.eval.solved_return}"
        )
    if state.counters.env_steps_sampled >= cfg.run.total_env_steps:
        return f"reached total_env_steps={cfg.run.total_env_steps:,}"
    if time.monotonic() - state.started >= cfg.run.max_wall_s:
        return f"reached max_wall_s={cfg.run.max_wall_s:g}"
    return ""


def next_multiple(value: int, every: int) -> int:
    return (value // every + 1) * every


class ProgressLine:
    """One console line every `every_s` seconds: env steps and updates with their rates,
    the replay's size, the loss and the latest evaluation."""

    def __init__(self, every_s: float, counters: Counters):
        self.every_s = every_s
        self.mark = (time.monotonic(), counters.env_steps_sampled, counters.learner_updates)

    def maybe_say(self, state: RunState) -> None:
        now = time.monotonic()
        if now - self.mark[0] < self.every_s:
            return
        c = state.counters
        elapsed = max(now - self.mark[0], 1e-9)
        steps_rate = (c.env_steps_sampled - self.mark[1]) / elapsed
        updates_rate = (c.learner_updates - self.mark[2]) / elapsed
        last = state.evaluations.last
        shown = f"{last['return_mean']:.1f}" if last else "-"
        state.say(
            f"env_steps={c.env_steps_sampled:,} ({steps_rate:,.0f}/s) "
            f"updates={c.learner_updates:,} ({updates_rate:,.0f}/s) "
            f"replay={state.replay_size:,} loss={state.last_loss:.4f} eval_return={shown}"
        )
        self.mark = (now, c.env_steps_sampled, c.learner_updates)
