"""The distributed DQN run loop (the Ape-X shape: Horgan et al. 2018,
https://arxiv.org/abs/1803.00933).

    collectors --add--> replay shards --sample_at--> learner
        ^                                               |
        +------ policy weights via the object store ----+

Only this loop knows all three roles. It keeps every actor busy with one call in
flight, holds collectors and learner to the configured replay ratio (updates per env
step) so results do not depend on how fast each side happens to run, evaluates the
greedy policy, reports and checkpoints. Each call in flight is a record of what was
asked; `Run.done` applies its result, `Run.lost` undoes it when it met a lost actor, and
`Run.recover` finds who died and rebuilds it. What happened reaches the run's state
(counters, console lines) through `RunState`'s methods alone (rayline.rl.bookkeeping).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from typing import Any

import ray

from rayline.family import CONSOLE_KEY
from rayline.rl.bookkeeping import (
    Counters,
    Evaluations,
    ProgressLine,
    RunState,
    next_multiple,
    stop_reason,
)
from rayline.rl.checkpoint import restore, write_checkpoint
from rayline.rl.collector import Collected
from rayline.rl.config import DQNConfig
from rayline.rl.fleet import (
    LearnerKeeper,
    ReplaySnapshots,
    alive,
    launch_fleet,
    network_spec,
    rebuild_learner,
    rebuild_replay,
    shard_capacity,
)
from rayline.rl.layout import Seeds
from rayline.rl.limiter import RateLimiter
from rayline.startup import process_started_unix_s

# report(metrics, checkpoint_dir or None): Tune's report, or a plain callback in tests. The
# directory is deleted after the call returns, so a reporter that keeps it must copy it.
Reporter = Callable[[dict, "str | None"], None]


def run_dqn(
    cfg: DQNConfig,
    report: Reporter,
    restore_dir: str | None = None,
    snapshot_uri: str | None = None,
    entered_unix_s: float | None = None,
) -> dict:
    """Train until solved or out of budget; returns the final metrics. Every report
    after a checkpoint interval, and the last one, carries a checkpoint directory.
    `entered_unix_s`: when the trainable began (its start-up is measured from there)."""
    run = Run(cfg, report, restore_dir, snapshot_uri, entered_unix_s or time.time())
    while True:
        run.launch()
        ref, call = run.wait()
        run.account(ref, call)
        run.report_when_due()
        reason = stop_reason(cfg, run.state)
        if reason:
            return run.finish(reason)


class Weights:
    """The policy weights collectors and evaluator are given: a ref the run loop owns (it
    outlives the learner), the learner updates they are from, and which collectors hold
    them already (by serial number: a collector is sent them once)."""

    def __init__(self, ref: ray.ObjectRef, updates: int, every_updates: int, collectors: int):
        self.ref, self.updates, self.every_updates = ref, updates, every_updates
        self.serial = 0
        self.held = [-1] * collectors

    def offer(self, ref: ray.ObjectRef, updates: int) -> bool:
        """Publish a learn call's weights if `every_updates` have passed since the last."""
        if updates - self.updates < self.every_updates:
            return False
        self.replace(ref, updates)
        return True

    def replace(self, ref: ray.ObjectRef, updates: int) -> None:
        self.ref, self.updates = ref, updates
        self.serial += 1

    def for_collector(self, index: int) -> list | None:
        """[ref] if collector `index` lacks the current weights (a list, so Ray hands the
        ref over instead of resolving it), else None. It holds them afterwards."""
        if self.held[index] == self.serial:
            return None
        self.held[index] = self.serial
        return [self.ref]

    @property
    def untrained(self) -> bool:
        """No learn call has published weights yet: the learner's are a random
        initialisation, as good to act with as a collector's own (which then need not
        wait for the learner's process, the slowest to start: it imports torch)."""
        return self.updates == 0 and self.serial == 0

    def forget(self, index: int) -> None:
        """Collector `index` may have lost them: its next call carries them again."""
        self.held[index] = -1


# The calls in flight: what each was asked, for the run loop to apply its result (`Run.done`)
# or undo it when it met a lost actor (`Run.lost`). `epoch`: Run.epoch at its launch.


@dataclasses.dataclass
class CollectCall:
    collector: int
    epoch: int = 0


@dataclasses.dataclass
class LearnCall:
    weights: ray.ObjectRef
    """The weights after these updates: the learn call's second result."""
    epoch: int = 0


@dataclasses.dataclass
class EvalCall:
    env_steps: int
    weights: ray.ObjectRef
    """What is evaluated goes with the evaluation: it is what is registered if kept."""
    confirming: dict | None = None
    """The record of the evaluation this one plays again on fresh seeds, if it does."""
    epoch: int = 0


@dataclasses.dataclass
class SnapshotCall:
    shard: int
    epoch: int = 0


Call = CollectCall | LearnCall | EvalCall | SnapshotCall


class Run:
    """One DQN run's loop (in the trial's process): the fleet, what it knows, and the
    calls in flight. Every actor has at most one call in flight."""

    def __init__(
        self,
        cfg: DQNConfig,
        report: Reporter,
        restore_dir: str | None,
        snapshot_uri: str | None,
        entered_unix_s: float | None = None,
    ):
        self.cfg, self.report = cfg, report
        self.startup = {
            "trial_process": process_started_unix_s(),
            "trainable": entered_unix_s or time.time(),
        }
        self.env, self.spec, self.obs_dtype = network_spec(cfg)
        self.seeds = Seeds(cfg.run.seed)
        shards = cfg.replay.shards
        self.state = RunState(
            Counters(),
            Evaluations(cfg.run.register, cfg.eval.solved_return, confirm_z=cfg.eval.confirm_z),
            time.monotonic(),
            shard_sizes=[0] * shards,
            shard_added=[0] * shards,
        )
        self.fleet = launch_fleet(cfg, self.env, self.spec, self.obs_dtype)
        self.startup["fleet_requested"] = time.time()
        # Asked now, answered as each actor is up: at the end an actor lost since (one
        # Ray is restarting on a node that may never come) is not waited for.
        self.started_calls = {
            "replay": [replay.started.remote() for replay in self.fleet.replays],
            "learner": [self.fleet.learner.started.remote()],
            "collector": [collector.started.remote() for collector in self.fleet.collectors],
            "evaluator": [self.fleet.evaluator.started.remote()],
        }
        if restore_dir:
            self.state.restored(restore(cfg, restore_dir, self.fleet))
        counters = self.state.counters
        self.snapshots = ReplaySnapshots(cfg.replay.snapshot_every_s, snapshot_uri, shards)
        self.limiter = RateLimiter(
            ratio=cfg.learner.updates_per_env_step,
            learning_starts=cfg.learner.learning_starts_env_steps,
            warmup_transitions=max(cfg.learner.learning_starts_env_steps, cfg.learner.batch_size),
            updates_per_call=cfg.learner.batches_per_fetch,
            steps_per_call=cfg.collectors.env_steps_per_call,
            num_collectors=cfg.collectors.num_collectors,
        )
        self.weights = Weights(
            self.fleet.learner.weights.remote(),
            counters.learner_updates,
            cfg.collectors.weight_sync_every_updates,
            len(self.fleet.collectors),
        )
        self.keeper = LearnerKeeper(cfg.learner.state_every_updates)
        self.keeper.keep(self.fleet.learner, counters.learner_updates)  # fresh or restored
        self.idle_collectors = list(range(len(self.fleet.collectors)))
        self.learner_busy = False
        self.in_flight: dict[ray.ObjectRef, Call] = {}
        self.epoch = 0
        """Rebuilding the learner or a replay shard starts a new epoch: a call launched
        before it that fails met what was lost, and is done again."""
        self.next_eval_at = next_multiple(counters.env_steps_sampled, cfg.eval.every_env_steps)
        self.next_checkpoint_at = next_multiple(
            counters.env_steps_sampled, cfg.run.checkpoint_every_env_steps
        )
        self.progress = ProgressLine(cfg.run.progress_every_s, counters)
        self.next_report_at = time.monotonic() + cfg.run.report_every_s
        self.next_hang_check = time.monotonic() + 2 * cfg.run.hang_timeout_s

    def confirm(self, record: dict, weights: ray.ObjectRef) -> None:
        """Play the evaluated weights again on seeds no evaluation used."""
        seed = self.seeds.confirmation(self.state.evaluations.confirmations)
        ref = self.fleet.evaluator.evaluate.remote([weights], self.cfg.eval.confirm_episodes, seed)
        self.start(ref, EvalCall(record["env_steps"], weights, confirming=record))

    def start(self, ref: ray.ObjectRef, call: Call) -> None:
        call.epoch = self.epoch
        self.in_flight[ref] = call

    def running(self, kind: type) -> bool:
        return any(isinstance(call, kind) for call in self.in_flight.values())

    def sizes(self) -> tuple[int, int, int]:
        counters = self.state.counters
        return counters.env_steps_sampled, counters.learner_updates, self.state.replay_size

    def launch(self) -> None:
        """Learner updates and collector calls as the rate limiter allows, an evaluation
        and replay snapshots when due."""
        cfg, fleet, limiter = self.cfg, self.fleet, self.limiter
        counters = self.state.counters
        if not self.learner_busy and limiter.learner_may_start(*self.sizes()):
            stats, weights = fleet.learner.train.remote(limiter.updates_per_call)
            self.start(stats, LearnCall(weights))
            self.learner_busy = True
        for index in list(self.idle_collectors):
            if limiter.collector_may_start(*self.sizes()):
                self.idle_collectors.remove(index)
                untrained = self.weights.untrained
                ref = fleet.collectors[index].collect.remote(
                    fleet.replay_of(index),
                    limiter.steps_per_call,
                    None if untrained else self.weights.for_collector(index),
                    counters.env_steps_sampled,
                    untrained,
                )
                self.start(ref, CollectCall(index))
                limiter.collecting()
        if counters.env_steps_sampled >= self.next_eval_at and not self.running(EvalCall):
            seed = self.seeds.evaluation(counters.evaluations)
            ref = fleet.evaluator.evaluate.remote([self.weights.ref], cfg.eval.episodes, seed)
            self.start(ref, EvalCall(counters.env_steps_sampled, self.weights.ref))
            self.next_eval_at += cfg.eval.every_env_steps
        if self.snapshots.due() and not self.running(SnapshotCall):
            for shard, replay in enumerate(fleet.replays):
                self.start(replay.snapshot.remote(self.snapshots.uri(shard)), SnapshotCall(shard))
        if not self.in_flight:
            raise RuntimeError("DQN run loop stalled: nothing in flight (rate limiter bug)")

    def wait(self) -> tuple[ray.ObjectRef, Call]:
        """The next call to finish. Every 2 x run.hang_timeout_s the actors are pinged
        and a hung one killed (Fleet.kill_hung): its call then fails and it is rebuilt
        like a dead one, where a hung actor's call would be waited on for ever."""
        timeout_s = self.cfg.run.hang_timeout_s
        while True:
            if time.monotonic() >= self.next_hang_check:
                self.next_hang_check = time.monotonic() + 2 * timeout_s
                self.state.hung_killed(self.fleet.kill_hung(timeout_s), timeout_s)
            timeout = max(0.0, self.next_hang_check - time.monotonic())
            with self.state.timers.timed("driver_wait"):
                ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
            if ready:
                return ready[0], self.in_flight.pop(ready[0])

    def account(self, ref: ray.ObjectRef, call: Call) -> None:
        """The call's result into the run's state, or, when it met a lost actor, the call
        undone (it did not happen) once the lost actor is rebuilt."""
        try:
            result = ray.get(ref)
            # A collector's add found the replay gone (this call's or its previous one's).
            failed = isinstance(call, CollectCall) and result.replay_lost
        except ray.exceptions.RayError:
            result, failed = None, True
        if failed and call.epoch == self.epoch:
            failed = self.recover(ref, call, result)
        if failed:
            self.lost(call)
        else:
            self.done(call, result)

    def done(self, call: Call, result: Any) -> None:
        """A call's result into the run."""
        match call:
            case CollectCall(collector=index):
                self.limiter.collected()
                self.collected(index, result)
                self.idle_collectors.append(index)
            case LearnCall():
                self.learner_busy = False
                self.state.learned(result)
                self.keeper.maybe_keep(self.fleet.learner, result.learner_updates)
                if self.weights.offer(call.weights, result.learner_updates):
                    self.state.weights_synced()
            case EvalCall():
                record = self.evaluated(call, result)
                if record is not None and self.state.evaluations.reaches_solved(record):
                    self.confirm(record, call.weights)  # learning goes on meanwhile
                self.send(self.state.metrics())
            case SnapshotCall():
                self.snapshots.taken()
                self.state.snapshot_taken(result)

    def lost(self, call: Call) -> None:
        """A call that met a lost actor: undone, to be done again where it matters."""
        match call:
            case CollectCall(collector=index):
                self.limiter.collected()
                self.weights.forget(index)
                self.idle_collectors.append(index)
            case LearnCall():
                self.learner_busy = False
            case EvalCall(confirming=None):
                self.next_eval_at = min(self.next_eval_at, call.env_steps)  # evaluate again
            case EvalCall():
                self.confirm(call.confirming, call.weights)  # play it again
            case SnapshotCall():
                pass  # the next one is due as planned

    def evaluated(self, call: EvalCall, returns: list[float]) -> dict | None:
        """An evaluation's returns into the evaluations; the new record (None for a
        confirmation)."""
        if call.confirming is None:
            return self.state.evaluated(call.env_steps, call.weights, returns)
        self.state.confirmed(call.env_steps, call.confirming, returns, call.weights)
        return None

    def recover(self, ref: ray.ObjectRef, call: Call, result: Any) -> bool:
        """Who died? A lost learner or replay shard (process or node) is rebuilt in the
        run; returns whether the failed call met one of them. A failure of the call's
        own is raised."""
        cfg, fleet, state = self.cfg, self.fleet, self.state
        timeout_s = cfg.run.hang_timeout_s
        learner_lost = not alive(fleet.learner, timeout_s)
        lost_shards = [i for i, r in enumerate(fleet.replays) if not alive(r, timeout_s)]
        if learner_lost:
            restored = rebuild_learner(cfg, self.spec, fleet, self.keeper)
            state.learner_rebuilt(restored)
            self.weights.replace(fleet.learner.weights.remote(), restored)
        for shard in lost_shards:
            recovered = rebuild_replay(cfg, self.spec, self.obs_dtype, fleet, shard, self.snapshots)
            state.replay_rebuilt(shard, recovered, named=cfg.replay.shards > 1)
        if learner_lost or lost_shards:
            self.epoch += 1
            return True
        if isinstance(call, CollectCall) and result is not None:
            return False  # an earlier add met a replay since replaced: this one counts
        ray.get(ref)  # a failure of its own: raise it
        raise AssertionError("unreachable: the call failed yet its result is there")

    def collected(self, index: int, result: Collected) -> None:
        self.state.collector_answered(index, result.incarnation)
        if result.needs_weights:
            self.weights.forget(index)
        else:
            self.state.collected(result, index % self.cfg.replay.shards, shard_capacity(self.cfg))

    def report_when_due(self) -> None:
        """A checkpoint every `run.checkpoint_every_env_steps`, training curves between
        evaluations every `run.report_every_s`, console lines when there are some."""
        state = self.state
        self.progress.maybe_say(state)
        if state.counters.env_steps_sampled >= self.next_checkpoint_at:
            self.next_checkpoint_at += self.cfg.run.checkpoint_every_env_steps
            self.report_with_checkpoint(state.metrics())
        elif time.monotonic() >= self.next_report_at or state.console:
            self.send(state.metrics())
        if time.monotonic() >= self.next_report_at:
            self.next_report_at = time.monotonic() + self.cfg.run.report_every_s

    def send(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Report, with the console lines said since the last report."""
        if self.state.console:
            metrics = {**metrics, CONSOLE_KEY: "\n".join(self.state.console)}
            self.state.console.clear()
        self.report(metrics, checkpoint_dir)

    def report_with_checkpoint(self, values: dict) -> None:
        with self.state.timers.timed("checkpoint"):
            directory = write_checkpoint(self.cfg, self.spec, self.fleet, self.state)
        try:
            self.send(values, directory)  # the reporter copies it (Tune into its storage)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def startup_metrics(self) -> dict:
        """When each part of the run's start-up happened (unix s): the trial's process,
        the trainable, the fleet's launch, and per role the latest of its first actors'
        process creation, constructor start and end (for a benchmark to split start-up)."""
        metrics = {f"startup_{name}_unix_s": t for name, t in self.startup.items()}
        for role, calls in self.started_calls.items():
            answered, _ = ray.wait(calls, num_returns=len(calls), timeout=1)
            try:
                times = ray.get(answered) if len(answered) == len(calls) else None
            except ray.exceptions.RayError:  # one died before it said: its start is not known
                times = None
            for i, part in enumerate(("process", "constructing", "ready")):
                if times:
                    metrics[f"startup_{role}_{part}_unix_s"] = max(t[i] for t in times)
        return metrics

    def finish(self, reason: str) -> dict:
        """Count what is still in flight, evaluate the final weights unless solved,
        checkpoint, stop the fleet."""
        state, counters = self.state, self.state.counters
        # Collector calls still running finish and are counted, so the final figures and
        # the checkpointed replay agree (a collector Ray is restarting answers once it is
        # back, in seconds); one that has nowhere to restart (its node gone) is not waited for.
        collecting = [ref for ref, call in self.in_flight.items() if isinstance(call, CollectCall)]
        finished, _ = ray.wait(collecting, num_returns=len(collecting), timeout=15)
        for ref in finished:
            call = self.in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            if not result.replay_lost:
                self.collected(call.collector, result)
        # An evaluation still running is waited for, not dropped; then, unless solved, the
        # learner's final weights are evaluated too.
        final_weights = self.weights.ref
        for ref, call in list(self.in_flight.items()):
            if isinstance(call, EvalCall):
                self.evaluated(call, ray.get(ref))
            elif isinstance(call, LearnCall) and not state.evaluations.solved:
                state.learned(ray.get(ref))
                final_weights = call.weights
        if not state.evaluations.solved:
            with state.timers.timed("eval"):
                seed = self.seeds.final_evaluation()
                returns = ray.get(
                    self.fleet.evaluator.evaluate.remote(
                        [final_weights], self.cfg.eval.episodes, seed
                    )
                )
            state.evaluated(counters.env_steps_sampled, final_weights, returns)
        state.say(f"stopped: {reason}")
        final = {**state.metrics(), **self.startup_metrics(), "stop_reason": reason}
        self.report_with_checkpoint(final)
        self.fleet.kill()
        return final
