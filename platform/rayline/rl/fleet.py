"""The DQN run's actors: launching the replay shards, the learner, the collectors and
the evaluator; keeping what a lost one is rebuilt from (replay snapshots, the learner's
state in the object store); rebuilding a lost one within the run."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayline.fs import filesystem
from rayline.rl.collector import CollectorActor, EvaluatorActor
from rayline.rl.config import DQNConfig, NetworkSpec, choose_torso
from rayline.rl.envs import FRAME_STACK, EnvSpec, describe_env
from rayline.rl.exploration import epsilon_ladder
from rayline.rl.layout import Bundles, Seeds
from rayline.rl.learner_actor import LearnerActor
from rayline.rl.replay import ReplayActor, Restored


def network_spec(cfg: DQNConfig) -> tuple[EnvSpec, NetworkSpec, np.dtype]:
    env = EnvSpec.of(cfg.env)
    obs_shape, obs_dtype, n_actions = describe_env(env)
    spec = NetworkSpec(
        list(obs_shape),
        n_actions,
        list(cfg.network.hidden_sizes),
        cfg.network.dueling,
        torso=choose_torso(cfg.network.torso, obs_shape),
        obs_dtype=np.dtype(obs_dtype).name,
        num_atoms=cfg.learner.num_atoms,
        v_min=cfg.learner.v_min,
        v_max=cfg.learner.v_max,
        noisy=cfg.network.noisy,
        noisy_sigma0=cfg.network.noisy_sigma0,
    )
    return env, spec, obs_dtype


@dataclasses.dataclass
class Fleet:
    """The run's actors: the replay shards, one learner, the collectors and an evaluator.
    Collector i adds to shard i % shards."""

    replays: list[ray.actor.ActorHandle]
    learner: ray.actor.ActorHandle
    collectors: list[ray.actor.ActorHandle]
    evaluator: ray.actor.ActorHandle
    killed_hung: list[ray.actor.ActorHandle] = dataclasses.field(default_factory=list)
    """The actors the last `kill_hung` killed."""

    def replay_of(self, collector: int) -> ray.actor.ActorHandle:
        return self.replays[collector % len(self.replays)]

    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """Every actor of the run, by the name the console gives it."""
        return {
            **{f"replay shard {i}": replay for i, replay in enumerate(self.replays)},
            "learner": self.learner,
            **{f"collector {i}": collector for i, collector in enumerate(self.collectors)},
            "evaluator": self.evaluator,
        }

    def kill(self) -> None:
        for actor in self.actors().values():
            ray.kill(actor)

    def kill_hung(self, timeout_s: float) -> list[str]:
        """Ping every actor at once (each answers from a thread of its own, busy or not:
        rayline.startup.HEALTH_GROUP); kill those that give no answer within `timeout_s`,
        so that their calls fail and they are rebuilt like dead ones. The names of those
        not killed already by the check before."""
        actors = self.actors()
        pings = {actor.ping.remote(): name for name, actor in actors.items()}
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        hung = [name for ref, name in pings.items() if ref not in answered]
        for name in hung:
            ray.kill(actors[name], no_restart=False)  # Ray restarts those it may
        # One killed before and not rebuilt yet (its calls have not failed back to the
        # run loop) is not news.
        news = [name for name in hung if actors[name] not in self.killed_hung]
        self.killed_hung = [actors[name] for name in hung]
        return news


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
        seed=Seeds(cfg.run.seed).replay(shard),
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


def alive(actor: ray.actor.ActorHandle, timeout_s: float) -> bool:
    """Whether the actor still answers (its process and node are up). One that gives no
    answer to a ping within `timeout_s` (run.hang_timeout_s) is hung: killed, and lost
    like a dead one. A ping is answered from a thread of its own, so a long call (an
    Atari evaluation) is not a hang."""
    try:
        ray.get(actor.ping.remote(), timeout=timeout_s)
        return True
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor, no_restart=False)
        return False
    except ray.exceptions.RayActorError:
        return False


def bundle_options(cfg: DQNConfig, role: str, collector: int = 0) -> dict[str, Any]:
    """Scheduling options that put the learner, and each collector, in its own bundle of
    the trial's placement group (rayline.rl.layout.Bundles); none outside a group.
    Explicit, because Ray packs an actor the group captures into any bundle it fits: two
    collectors in the learner's bundle leave the learner nowhere to start."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return {}
    index = Bundles.of(cfg).index(len(group.bundle_specs), role, collector)
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index
        )
    }


def launch_fleet(cfg: DQNConfig, env: EnvSpec, spec: NetworkSpec, obs_dtype) -> Fleet:
    # Collectors first: Ray hands the first actors the worker processes it started ahead,
    # and collectors can step their envs before the learner is up (see Weights.untrained).
    num_collectors, envs_each = cfg.collectors.num_collectors, cfg.env.num_envs_per_collector
    fleet = num_collectors * envs_each
    collectors = [
        CollectorActor.options(
            num_cpus=cfg.collectors.num_cpus,
            resources=cfg.collectors.resources,
            **bundle_options(cfg, "collector", c),
        ).remote(
            env=env,
            network=spec,
            num_envs=envs_each,
            # Noisy nets explore by their noise: no epsilon, from the first step.
            epsilons=[
                0.0
                if cfg.network.noisy
                else epsilon_ladder(
                    c * envs_each + e,
                    fleet,
                    cfg.collectors.epsilon_base,
                    cfg.collectors.epsilon_alpha,
                )
                for e in range(envs_each)
            ],
            n_step=cfg.learner.n_step,
            gamma=cfg.learner.gamma,
            epsilon_decay_env_steps=0
            if cfg.network.noisy
            else cfg.collectors.epsilon_decay_env_steps,
            inference=cfg.collectors.inference,
            seed=Seeds(cfg.run.seed).collector(c),
        )
        for c in range(num_collectors)
    ]
    replays = [launch_replay(cfg, spec, obs_dtype, shard) for shard in range(cfg.replay.shards)]
    # The learner's process imports torch (2.6 CPU-seconds): started beside the collectors
    # on a small machine it made their start 0.9 s later, and they are what the first env
    # step waits for (the learner is not needed before learning_starts_env_steps).
    ray.wait([c.started.remote() for c in collectors], num_returns=len(collectors), timeout=5)
    learner = launch_learner(cfg, spec, replays)
    return Fleet(replays, learner, collectors, EvaluatorActor.remote(env, spec))


def launch_learner(cfg: DQNConfig, spec: NetworkSpec, replays: list[ray.actor.ActorHandle]):
    return LearnerActor.options(
        num_cpus=cfg.learner.num_cpus,
        num_gpus=cfg.learner.num_gpus,
        resources=cfg.learner.resources,
        **bundle_options(cfg, "learner"),
    ).remote(
        replays,
        shard_capacity(cfg),
        spec,
        cfg.learner,
        beta=cfg.replay.beta,
        seed=Seeds(cfg.run.seed).learner(),
        threads=torch_threads(cfg.learner.num_cpus),
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

    def taken(self) -> None:
        """A snapshot call came back: the next is due `every_s` from now."""
        self.next_at = time.monotonic() + self.every_s

    def restore(self, replay: ray.actor.ActorHandle, shard: int) -> Restored:
        """The rebuilt shard's size and count of adds: its latest snapshot's, or empty when
        none was written (a snapshot appears whole or not at all: the write is atomic,
        and one still being written died with the replay)."""
        fs, path = filesystem(self.uri(shard))
        if fs.get_file_info(path).type != pafs.FileType.File:
            return Restored(0, 0)
        return ray.get(replay.restore.remote(self.uri(shard)))


class LearnerKeeper:
    """The learner's whole state (policy, target, optimiser, update counters), kept in the
    object store every `learner.state_every_updates` updates and owned by the run loop, so
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
                    "resources it needs (learner.num_gpus, learner.num_cpus, learner.resources)"
                ) from None
            except ray.exceptions.RayError:  # that state was lost with the learner
                continue
        return learner, 0


def rebuild_replay(
    cfg: DQNConfig,
    spec: NetworkSpec,
    obs_dtype,
    fleet: Fleet,
    shard: int,
    snapshots: ReplaySnapshots,
) -> Restored:
    """A new replay shard from its latest snapshot, the learner pointed at it (collectors
    get the handle with each call); what it was restored with."""
    fleet.replays[shard] = launch_ready_replay(cfg, spec, obs_dtype, shard)
    recovered = snapshots.restore(fleet.replays[shard], shard)
    ray.get(fleet.learner.use_replay.remote(fleet.replays))
    return recovered


def rebuild_learner(cfg: DQNConfig, spec: NetworkSpec, fleet: Fleet, keeper: LearnerKeeper) -> int:
    """A new learner actor from the latest kept state; its update count. The collectors
    go on meanwhile."""
    fleet.learner, restored = keeper.rebuild(cfg, spec, fleet.replays)
    keeper.keep(fleet.learner, restored)
    return restored


def torch_threads(cpus: float) -> int:
    """torch threads for a worker that reserved `cpus`: one per whole CPU, at least one
    (2 threads on 2 busy cores made a learner 5x slower)."""
    return max(1, int(cpus))
