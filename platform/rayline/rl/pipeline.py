"""The DQN pipeline's driver-side pieces: the checks that run before Ray starts, and
what is registered when the run ends.

Registration takes the weights an evaluation scored, not the learner's latest: the
driver keeps the weights of its best (or latest) greedy evaluation and checkpoints them;
registration loads exactly those bytes into a fresh network, runs `eval.episodes`
greedy episodes on seeds no evaluation of the run used, and records both figures. A run
is registered as solved only when the stored policy reaches the solved return again.
"""

from __future__ import annotations

import io
import json
import sys
import time
from contextlib import nullcontext

import gymnasium

from rayline.config import ConfigError, from_dict
from rayline.drift import PROFILE_FILE
from rayline.family import Pipeline, model_metrics, trial_record
from rayline.fs import fingerprint
from rayline.rl.config import DQNConfig, choose_torso
from rayline.rl.envs import EnvSpec, describe_env, evaluate_greedy, load_env_package
from rayline.rl.layout import COMPARE_SEED, Bundles, Seeds
from rayline.rl.served import SERVED
from rayline.store import ModelRegistry, ModelVersion

# torch is imported where it is used: the CLI's checks before Ray starts and `rayline
# config show dqn` never pay for it (1.4 s); `rayline train` imports it for registration
# in the background while the trial runs (register_imports).


def prepare(cfg: DQNConfig) -> dict:
    """Check, in the driver and before Ray starts, what a trial would otherwise find out
    after start-up: that the env exists, has discrete actions and can be built, and that
    the learner's device is one this run can have."""
    env = EnvSpec.of(cfg.env)
    try:
        load_env_package(env.package)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"env.package: {cfg.env.package!r}: {exc}") from None
    try:
        obs_shape, _, _ = describe_env(env)
    except ModuleNotFoundError as exc:
        extra = " (pip install 'rayline[atari]')" if "ale_py" in str(exc) else ""
        raise ConfigError(f"env.id: {cfg.env.id!r} needs {exc.name}{extra}") from None
    except gymnasium.error.Error as exc:
        hint = ""
        if "Namespace" in str(exc) and not cfg.env.package:
            hint = " (an env registered by another package: set env.package, e.g. minatar.gym:register_envs)"
        raise ConfigError(f"env.id: {' '.join(str(exc).split())}{hint}") from None
    except ValueError as exc:  # a continuous action space
        raise ConfigError(str(exc)) from None
    try:
        torso = choose_torso(cfg.network.torso, obs_shape)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({cfg.env.id})") from None
    if cfg.learner.num_atoms > 1 and not cfg.learner.v_min < cfg.learner.v_max:
        raise ConfigError(
            f"learner.v_min: {cfg.learner.v_min:g} must be below learner.v_max: {cfg.learner.v_max:g}"
        )
    check_device(cfg.learner.device, cfg.learner.num_gpus)
    if cfg.collectors.inference == "int8":
        if torso != "nature_cnn":
            raise ConfigError(
                f"collectors.inference: int8 is for image observations (the Nature CNN); "
                f"{cfg.env.id} has observations of shape {tuple(obs_shape)} ({torso})"
            )
        if cfg.network.noisy:
            raise ConfigError(
                "collectors.inference: int8 does not quantize noisy layers (network.noisy)"
            )
        from rayline.rl.networks import quantized_engine

        if quantized_engine() is None:
            raise ConfigError("collectors.inference: int8: this torch has no int8 CPU kernels")
    return {}


def check_device(device: str, num_gpus: float) -> None:
    if device == "auto":
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"learner.device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and num_gpus <= 0:
        raise ConfigError(
            f"learner.device: {device!r} needs learner.num_gpus > 0 (Ray shows an actor "
            "only the GPUs it reserves)"
        )


def env_fingerprint(cfg: DQNConfig) -> str:
    """The environment as data: its id, gymnasium's version (dynamics change between
    releases) and every wrapper setting that shapes observations and rewards."""
    preprocessing = {
        "atari": cfg.env.atari,
        "max_episode_steps": cfg.env.max_episode_steps,
        "atari_preprocessing": (
            {"frame_skip": 4, "screen_size": 84, "noop_max": 30, "frame_stack": 4}
            if cfg.env.atari
            else None
        ),
    }
    if cfg.env.package:  # only when set: fingerprints of runs before it stay the same
        preprocessing["package"] = cfg.env.package
    return fingerprint(cfg.env.id, gymnasium.__version__, json.dumps(preprocessing, sort_keys=True))


def reevaluate(cfg: DQNConfig, policy: bytes, network: dict) -> tuple[list[float], dict | None]:
    """Greedy returns of the stored policy bytes on `eval.episodes` fresh seeds, and the
    drift reference of what it saw and did there (the deciles of each observation
    dimension, or of an image stack's frame features, and the actions' shares:
    rayline.drift, rayline.rl.predictor.observation_features)."""
    import numpy as np
    import torch

    from rayline.drift import build_profile
    from rayline.rl.config import NetworkSpec
    from rayline.rl.networks import build_q_network, greedy_actions
    from rayline.rl.predictor import observation_features

    spec = NetworkSpec(**network)
    net = build_q_network(spec).eval()
    net.load_state_dict(torch.load(io.BytesIO(policy), map_location="cpu", weights_only=True))
    env = EnvSpec.of(cfg.env)
    seed = Seeds(cfg.run.seed).registration()
    greedy = greedy_actions(net)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def act(obs: np.ndarray) -> np.ndarray:
        actions = greedy(obs)
        # Features at once: an Atari evaluation's frames would be hundreds of MB kept.
        seen.append((observation_features(np.asarray(obs))[0], np.asarray(actions)))
        return actions

    returns = evaluate_greedy(env, act, cfg.eval.episodes, seed)
    features = np.concatenate([rows for rows, _ in seen])
    names = observation_features(np.zeros((1, *spec.obs_shape)))[1]
    actions = np.concatenate([a for _, a in seen])
    return returns, build_profile(features, names, actions, list(range(spec.n_actions)))


def register(cfg: DQNConfig, result, registry: ModelRegistry, inputs: dict) -> ModelVersion:
    """Register the checkpoint's evaluated policy with its evaluation and a fresh one."""
    from rayline.rl.checkpoint import read_policy

    if result.checkpoint is None:
        raise RuntimeError("the best trial left no checkpoint")
    with result.checkpoint.as_directory() as directory:
        policy, state = read_policy(directory)
    kept = state["kept_evaluation"]
    returns, profile = reevaluate(cfg, policy, state["network"])
    registered_return = sum(returns) / len(returns)
    solved = cfg.eval.solved_return is not None and registered_return >= cfg.eval.solved_return
    if result.metrics.get("solved") and not solved:
        print(
            f"rayline: {cfg.run.name}: the registered policy scored {registered_return:.1f} "
            f"on {len(returns)} fresh episodes, below eval.solved_return="
            f"{cfg.eval.solved_return:g}; it is not registered as solved",
            file=sys.stderr,
            flush=True,
        )
    metrics = {
        **model_metrics(result),
        "solved": solved,
        "evaluated_return_mean": kept["return_mean"],
        "evaluated_at_env_steps": kept["env_steps"],
        "registered_eval_return": registered_return,
        "registered_eval_episodes": len(returns),
        "registered_eval_seed": Seeds(cfg.run.seed).registration(),
        "registered_weights": "last" if cfg.run.register == "last" else "best",
    }
    files = {"policy.pt": policy, "network.json": json.dumps(state["network"]).encode()}
    if profile is not None:
        files[PROFILE_FILE] = json.dumps(profile).encode()
    return registry.register(
        cfg.run.name,
        files,
        kind="dqn",
        metrics=metrics,
        config=state["config"],
        data_fingerprint=env_fingerprint(cfg),
        run=trial_record(result),
    )


def dqn_trainable(config: dict) -> None:
    """Ray Tune function trainable: one DQN run per trial, resumable from its checkpoint."""
    from ray import tune

    from rayline.rl.apex import run_dqn

    entered = time.time()
    cfg = from_dict(DQNConfig, config)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(_tune_safe(metrics), checkpoint=checkpoint)

    context = tune.get_context()
    folder = cfg.replay.snapshot_dir or context.get_trial_dir()
    snapshot_uri = f"{folder.rstrip('/')}/replay-{context.get_trial_id()}.parquet"
    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else nullcontext(None) as restore_dir:
        run_dqn(cfg, report, restore_dir, snapshot_uri, entered)


def trial_resources(cfg: DQNConfig):
    """The trial's placement group, as `Bundles` lays it out (rayline.rl.layout)."""
    from ray import tune

    return tune.PlacementGroupFactory(Bundles.of(cfg).bundles())


def _tune_safe(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def compare(registry: ModelRegistry, a: ModelVersion, b: ModelVersion, episodes: int):
    """Both policies play the same `episodes` fresh seeds (episode i on seed
    COMPARE_SEED + i for each); the paired differences of their returns."""
    import torch

    from rayline.compare import paired
    from rayline.rl.config import NetworkSpec
    from rayline.rl.networks import build_q_network, greedy_actions

    def played(mv: ModelVersion) -> tuple[dict, dict]:
        env = mv.config.get("env", {})
        return {"env id": env.get("id"), "atari": env.get("atari", False)}, json.loads(
            registry.read_file(mv, "network.json")
        )

    (env_a, net_a), (env_b, net_b) = played(a), played(b)
    for what, x, y in (
        ("env id", env_a["env id"], env_b["env id"]),
        ("observation shape", net_a["obs_shape"], net_b["obs_shape"]),
        ("number of actions", net_a["n_actions"], net_b["n_actions"]),
    ):
        if x != y:
            raise ConfigError(
                f"{a.name} v{a.version} and v{b.version} cannot be compared: {what} {x} vs {y}"
            )
    returns = []
    for mv, network in ((a, net_a), (b, net_b)):
        net = build_q_network(NetworkSpec(**network)).eval()
        policy = registry.read_file(mv, "policy.pt")
        net.load_state_dict(torch.load(io.BytesIO(policy), map_location="cpu", weights_only=True))
        env = EnvSpec.of(mv.config.get("env", {}))
        returns.append(evaluate_greedy(env, greedy_actions(net), episodes, COMPARE_SEED))
    return paired("eval_return_mean", True, (a.version, returns[0]), (b.version, returns[1]))


PIPELINE = Pipeline(
    "dqn",
    DQNConfig,
    dqn_trainable,
    trial_resources,
    "eval_return_mean",
    "max",
    register,
    prepare=prepare,
    step_key="env_steps_sampled",
    serves=SERVED,
    compare=compare,
    register_imports=("torch", "rayline.rl.networks", "rayline.rl.predictor"),
)
