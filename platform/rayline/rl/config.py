"""The distributed DQN pipeline's config: one typed object, logged and checkpointed."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from rayline.config import RunConfig, SweepConfig, bounded, named


@dataclasses.dataclass
class EnvConfig:
    id: str = "CartPole-v1"
    """A registered gymnasium id with a discrete action space (`module:Id` imports module)."""
    package: str = ""
    """A module that registers env.id, imported before any env is made (in the driver and
    in every actor), and where it needs one its registration function, called once:
    `minatar.gym:register_envs`. gymnasium 1.x loads no plugins by itself."""
    atari: bool = False
    """Wrap in gymnasium's Atari preprocessing (84x84 grey, frame skip 4) and stack 4 frames."""
    max_episode_steps: int | None = bounded(None, ge=1)
    """Override the env's time limit; truncation at it bootstraps, termination does not."""
    num_envs_per_collector: int = bounded(8, ge=1)
    """Sub-envs each collector steps in one vector env."""


@dataclasses.dataclass
class NetworkSpec:
    """Everything needed to rebuild a Q-network; saved beside its weights."""

    obs_shape: list[int]
    n_actions: int
    hidden_sizes: list[int]
    dueling: bool
    torso: str = ""
    """mlp, nature_cnn or small_cnn (never auto); "" in specs saved before it existed:
    the Nature CNN for 3-D observations, else the MLP."""
    obs_dtype: str = ""
    """The env's observation dtype; uint8 pixels are scaled by 1/255 inside the network.
    "" in older specs: uint8 for 3-D observations."""
    num_atoms: int = 1
    """Above 1: a distributional (C51) head over that many return atoms."""
    v_min: float = -10.0
    v_max: float = 10.0
    noisy: bool = False
    """The Q-head's layers are factorised-Gaussian noisy layers."""
    noisy_sigma0: float = 0.5

    def resolved_torso(self) -> str:
        if self.torso:
            return self.torso
        return "nature_cnn" if len(self.obs_shape) == 3 else "mlp"

    def observation_dtype(self) -> str:
        return self.obs_dtype or ("uint8" if len(self.obs_shape) == 3 else "float32")

    def pixel_scale(self) -> float:
        """What the network multiplies observations by before its first layer."""
        return 1.0 / 255.0 if self.observation_dtype() == "uint8" else 1.0

    def byte_observations(self) -> bool:
        """Observations that travel as bytes (the Open Inference Protocol's UINT8, an
        export's input): uint8 pixels and bool grids (0 or 1)."""
        return self.observation_dtype() in ("uint8", "bool")

    def plain_mlp(self) -> bool:
        """An MLP with a plain (or dueling) head: what numpy acts with, without torch."""
        return self.resolved_torso() == "mlp" and self.num_atoms == 1 and not self.noisy


NATURE_CNN_MIN_SIZE = 36
"""The Nature CNN's smallest input side (8x8 stride 4, 4x4 stride 2, 3x3 convolutions)."""
SMALL_CNN_KERNEL = 3


def channels_last(obs_shape: tuple[int, ...] | list[int]) -> bool:
    """An image's channel axis: last when it is strictly the smallest side, as MinAtar's
    (10, 10, 4) and gymnasium's (H, W, 3) renders; first otherwise, as stacked Atari frames
    (4, 84, 84)."""
    return len(obs_shape) == 3 and obs_shape[2] < min(obs_shape[0], obs_shape[1])


def image_size(obs_shape) -> tuple[int, int]:
    height, width = (obs_shape[0], obs_shape[1]) if channels_last(obs_shape) else obs_shape[1:]
    return height, width


def choose_torso(requested: str, obs_shape: tuple[int, ...] | list[int]) -> str:
    """The torso for observations of `obs_shape`: `auto` picks the MLP for vectors, the
    Nature CNN for images of at least 36 x 36 and the small CNN for smaller ones; a torso
    the shape cannot go through raises ValueError naming the shape."""
    shape = tuple(obs_shape)
    if requested == "mlp":
        return "mlp"
    if requested == "auto":
        if len(shape) == 1:
            return "mlp"
        if len(shape) != 3:
            raise ValueError(
                f"network.torso: auto fits vector (1-D) and image (3-D) observations, not "
                f"shape {list(shape)}; set network.torso: mlp to flatten them"
            )
        small = min(image_size(shape)) < NATURE_CNN_MIN_SIZE
        return "small_cnn" if small else "nature_cnn"
    if len(shape) != 3:
        raise ValueError(
            f"network.torso: {requested} needs image observations (3-D), not shape {list(shape)}"
        )
    smallest = min(image_size(shape))
    if requested == "nature_cnn" and smallest < NATURE_CNN_MIN_SIZE:
        raise ValueError(
            f"network.torso: nature_cnn needs images of at least {NATURE_CNN_MIN_SIZE} x "
            f"{NATURE_CNN_MIN_SIZE}, not shape {list(shape)}; small_cnn fits them"
        )
    if requested == "small_cnn" and smallest < SMALL_CNN_KERNEL:
        raise ValueError(
            f"network.torso: small_cnn needs images of at least {SMALL_CNN_KERNEL} x "
            f"{SMALL_CNN_KERNEL}, not shape {list(shape)}"
        )
    return requested


@dataclasses.dataclass
class NetworkConfig:
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    """MLP layer sizes; for image observations only the last is used (the head)."""
    dueling: bool = True
    """Split the head into state value and action advantages."""
    torso: Literal["auto", "mlp", "nature_cnn", "small_cnn"] = "auto"
    """What turns observations into features. `auto`: the MLP for vectors; for images
    (3-D, channels first or last) the Nature CNN from 36 x 36 up (Atari's 4 x 84 x 84
    stacks), else the small CNN (MinAtar's reference: one 3 x 3 convolution of 16
    filters), for bool, uint8 or float pixels."""
    noisy: bool = False
    """Noisy nets (Fortunato et al. 2018): the Q-head's layers are factorised Gaussian
    noisy layers whose noise scale is learned, drawn afresh for every update and every
    acting step. They replace epsilon-greedy: the collectors' Ape-X ladder is off (every
    sub-env acts greedily on its noisy network, the diversity across collectors coming
    from each drawing its own noise). Evaluation, serving and export use the mean weights."""
    noisy_sigma0: float = bounded(0.5, gt=0.0)
    """The noise scale's initial value, sigma0 / sqrt(fan_in) per weight (the paper's 0.5)."""


@dataclasses.dataclass
class ReplayConfig:
    RENAMED: ClassVar[dict[str, str]] = {"snapshot": "checkpoint"}
    """Old key -> its name now (rayline.config.from_dict reads both)."""

    capacity: int = bounded(100_000, ge=1)
    """Transitions held (over all shards); the oldest are overwritten. With Atari
    (env.atari) each 84x84 frame is stored once, about 7 KB per transition."""
    prioritized: bool = True
    """Proportional prioritised sampling by TD error; false samples uniformly."""
    alpha: float = bounded(0.6, ge=0.0, le=1.0)
    """How strongly priorities skew sampling (0 = uniform)."""
    beta: float = bounded(0.4, ge=0.0, le=1.0)
    """Importance-weight exponent that corrects the skew (1 = fully)."""
    shards: int = bounded(1, ge=1)
    """Replay actors the capacity is split over. Collector i adds to shard i % shards;
    the learner draws each batch across them in proportion to each shard's priority mass,
    the same distribution as one buffer holding them all. Several shards are spread over
    the nodes: use them when one replay actor's core is what limits the run."""
    checkpoint: bool = False
    """Save the replay to Parquet with every checkpoint, so a resumed run keeps its data
    (was `replay.snapshot`, still read: "snapshot" now means only the background copies
    below)."""
    snapshot_every_s: float = bounded(60.0, ge=0.0)
    """Snapshot the replay to Parquet in the background this often (0 = never): a replay
    actor that dies is rebuilt from the latest one within the run, and the transitions
    added since are lost (counted as transitions_lost). Adds and samples wait only while
    the buffer is copied (time_replay_snapshot_stall_s)."""
    snapshot_dir: str = ""
    """Where the background snapshots go (a path or s3://, gs:// URI); empty: the trial's
    folder on the node its run loop runs on. On several nodes, a place every node reaches,
    so a replay rebuilt on another node can read it."""
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources the replay actor needs: places it on the nodes that have them
    (e.g. {"replay": 1} on a node with the memory for it)."""


@dataclasses.dataclass
class LearnerConfig:
    lr: float = bounded(1e-3, gt=0.0)
    """Adam learning rate."""
    batch_size: int = bounded(64, ge=1)
    """Transitions per gradient step."""
    gamma: float = bounded(0.99, ge=0.0, le=1.0)
    """Discount factor."""
    n_step: int = bounded(3, ge=1)
    """Rewards summed before bootstrapping."""
    double_q: bool = True
    """Pick the bootstrap action with the online network, value it with the target."""
    num_atoms: int = bounded(1, ge=1, le=1001)
    """Above 1: distributional C51 (Bellemare et al. 2017) over this many atoms between
    v_min and v_max (the paper's 51): the n-step target's distribution is projected onto
    the atoms and learned with cross-entropy in place of the Huber loss, priorities are
    that loss, and actions are greedy on the expected values everywhere."""
    v_min: float = -10.0
    """C51's smallest return atom."""
    v_max: float = 10.0
    """C51's largest return atom; returns outside [v_min, v_max] are clipped to it."""
    target_sync_every_updates: int = bounded(500, ge=1)
    """Hard-copy the policy into the target network every this many learner updates."""
    tau: float = bounded(1.0, gt=0.0, le=1.0)
    """Below 1: Polyak-average the target every update instead of hard copies."""
    grad_clip_norm: float = bounded(10.0, ge=0.0)
    """Clip the gradient's global norm (0 = off)."""
    updates_per_env_step: float = bounded(0.5, gt=0.0)
    """Replay ratio: learner updates per env step collected. Collectors and learner are
    held within a small slack of it, so results do not depend on machine speed."""
    learning_starts_env_steps: int = bounded(1000, ge=0)
    """Env steps collected before the first update."""
    batches_per_fetch: int = bounded(16, ge=1)
    """Batches fetched from the replay per round trip (and updates per learner call)."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`."""
    num_cpus: float = bounded(1.0, ge=0.0)
    """CPUs reserved for the learner actor (and its torch threads: one per whole CPU)."""
    num_gpus: float = bounded(0.0, ge=0.0)
    """GPUs reserved for the learner actor."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """`bfloat16`: the networks' forward and backward under autocast (the loss, targets
    and TD errors stay float32). Pays where the hardware has bfloat16 units (GPUs since
    Ampere; CPUs with AVX512-BF16 or AMX): `benchmarks/dqn_scale.py` measures both."""
    compile: bool = False
    """Pass the learner's forward and loss through `torch.compile` (tens of seconds of
    compiling at start; `benchmarks/dqn_scale.py` measures whether it pays)."""
    state_every_updates: int = bounded(500, ge=1)
    """Keep the learner's whole state (networks, optimiser, counters) in the object store
    this often: a learner that dies is rebuilt from it within the run, and the updates
    made since are lost (counted as updates_lost)."""
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources the learner needs: places it on the nodes that have them."""


@dataclasses.dataclass
class CollectorConfig:
    num_collectors: int = bounded(2, ge=1)
    """Collector actors stepping envs in parallel."""
    env_steps_per_call: int = bounded(256, ge=1)
    """Env steps (over all sub-envs) a collector takes per call before reporting."""
    weight_sync_every_updates: int = bounded(64, ge=1)
    """Collectors load fresh policy weights when this many updates have passed."""
    epsilon_base: float = bounded(0.4, ge=0.0, le=1.0)
    """Ape-X ladder: sub-env i of N explores with base ** (1 + alpha * i / (N - 1))."""
    epsilon_alpha: float = bounded(7.0, ge=0.0)
    """Ape-X ladder exponent."""
    epsilon_decay_env_steps: int = bounded(10_000, ge=0)
    """Each sub-env's rate falls linearly from 1.0 to its ladder value over these steps."""
    num_cpus: float = bounded(0.5, ge=0.0)
    """CPUs reserved per collector actor."""
    inference: Literal["float32", "int8"] = "float32"
    """How collectors run the policy to act. `int8` (image observations only): the Nature
    CNN quantized on each weight load, about 3x faster on a CPU core, where its float
    forward pass costs as much as an Atari step; Q-values within ~1 % of the float ones.
    The learner, evaluation and the registered policy stay float32."""
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each collector needs: places collectors on the nodes that
    have them (a collector node group)."""


@dataclasses.dataclass
class EvalConfig:
    every_env_steps: int = bounded(5000, ge=1)
    """Run a greedy evaluation each time this many more env steps are collected."""
    episodes: int = bounded(20, ge=1)
    """Greedy episodes per evaluation."""
    solved_return: float | None = 475.0
    """Stop early once the mean evaluation return reaches this (null = never), and the
    same weights' episodes on fresh seeds confirm it (see confirm_z)."""
    confirm_episodes: int = bounded(100, ge=1, le=1000)
    """Greedy episodes of the confirmation. More than an evaluation's: a policy that
    fails one CartPole episode in 15 plays 40 at 500 (an evaluation and a confirmation
    of 20) one time in 20, and then scores under 475 on registration's 20."""
    confirm_z: float = bounded(2.0, ge=0.0)
    """The confirmation holds when its mean return less this many standard errors still
    reaches solved_return: a policy at 478 +- 40 per episode is not called solved on 20
    episodes (registration's own fresh episodes then fall under 475 one time in three).
    0 = the mean alone."""


@dataclasses.dataclass
class DQNRunConfig(RunConfig):
    name: str = named("dqn")
    seed: int = 0
    """Seeds envs, exploration and network initialisation."""
    register: Literal["best", "last"] | bool = "best"
    """Which evaluated weights to register when the run ends: `best` (the weights of the
    highest-scoring greedy evaluation, also `true`) or `last` (those of the latest one);
    `false` registers nothing. Registration evaluates them again on fresh seeds."""
    total_env_steps: int = bounded(300_000, ge=1)
    """Stop after this many env steps."""
    max_wall_s: float = bounded(600.0, gt=0.0)
    """Stop after this many seconds of training."""
    checkpoint_every_env_steps: int = bounded(50_000, ge=1)
    """Checkpoint learner, counters and config this often (and always at the end)."""
    progress_every_s: float = bounded(5.0, gt=0.0)
    """Seconds between one-line progress reports."""
    report_every_s: float = bounded(5.0, gt=0.0)
    """Seconds between reports to Tune (loss, rates, episode returns; TensorBoard's points),
    besides the one after every evaluation and checkpoint."""
    hang_timeout_s: float = bounded(10.0, gt=0.0)
    """An actor that does not answer a ping within this many seconds is hung (its process
    stopped, its node frozen): killed, and rebuilt like a dead one. The run loop pings
    every actor every twice this; a ping is answered while a long call runs."""


@dataclasses.dataclass
class DQNConfig:
    pipeline: Literal["dqn"] = "dqn"
    """Which pipeline this file configures."""
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    collectors: CollectorConfig = dataclasses.field(default_factory=CollectorConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: DQNRunConfig = dataclasses.field(default_factory=DQNRunConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    """Search space for `rayline sweep` (default metric: eval_return_mean, max)."""
