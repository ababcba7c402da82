"""DQN beyond classic control: MinAtar's small boolean images (Young and Tian 2019), an
env package registered in every process, compact replay, and Rainbow's parts through the
whole pipeline: train, register, serve, export."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from rayline import pipelines
from rayline.config import from_dict
from rayline.rl.collector import Collector
from rayline.rl.config import DQNConfig, LearnerConfig, NetworkSpec
from rayline.rl.envs import EnvSpec, describe_env
from rayline.rl.learner import Learner
from rayline.rl.predictor import DQNPolicy
from rayline.rl.replay import ReplayBuffer
from rayline.store import ModelRegistry
from test_export import TOLERANCE, export, register_network

BREAKOUT = EnvSpec("MinAtar/Breakout-v1", package="minatar.gym:register_envs")


def rayline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayline.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_an_env_of_another_package_is_named_before_ray_starts():
    """gymnasium 1.x loads no plugins: MinAtar's ids exist only once its registration
    function has run. Without env.package the error says so; with it the run is checked
    through, with the small CNN its (10, 10, 4) grids need."""
    missing = rayline("train", "pipelines/dqn-cartpole.yaml", "--set", "env.id=MinAtar/Breakout-v1")
    assert missing.returncode == 2
    assert "Namespace MinAtar not found" in missing.stderr
    assert "set env.package, e.g. minatar.gym:register_envs" in missing.stderr
    assert "Ray" not in missing.stderr + missing.stdout  # nothing started
    wrong_torso = rayline(
        "train", "pipelines/dqn-minatar-breakout.yaml", "--set", "network.torso=nature_cnn"
    )
    assert wrong_torso.returncode == 2
    assert "not shape [10, 10, 4]; small_cnn fits them" in wrong_torso.stderr
    no_function = rayline(
        "train", "pipelines/dqn-minatar-breakout.yaml", "--set", "env.package=minatar.gym:nothing"
    )
    assert no_function.returncode == 2
    assert "env.package: 'minatar.gym:nothing': module minatar.gym has no function" in (
        no_function.stderr
    )
    pipeline, cfg = pipelines.load_pipeline("pipelines/dqn-minatar-breakout.yaml", {})
    pipeline.prepare(cfg)  # checked through, as `rayline train` does


def test_bool_grids_stay_bool_from_the_env_through_replay_to_the_learner():
    """No float32 copies: a MinAtar transition holds 2 x 400 bytes of observations."""
    shape, dtype, actions = describe_env(BREAKOUT)
    assert (shape, dtype, actions) == ((10, 10, 4), np.dtype(bool), 3)
    spec = NetworkSpec(list(shape), actions, [32], True, torso="small_cnn", obs_dtype="bool")
    collector = Collector(BREAKOUT, spec, num_envs=4, epsilons=[1.0] * 4, n_step=3, gamma=0.99)
    batch, stats = collector.collect(400)
    assert batch.obs.dtype == bool and batch.next_obs.dtype == bool
    replay = ReplayBuffer(1000, shape, dtype, prioritized=True)
    replay.add(batch)
    assert replay.storage.obs.dtype == bool
    assert replay.storage.obs.nbytes + replay.storage.next_obs.nbytes == 2 * 1000 * 400
    sample = replay.sample(32, beta=0.4)
    assert sample.obs.dtype == bool
    learner = Learner(spec, LearnerConfig(device="cpu", num_atoms=11, v_min=-1, v_max=5))
    loss, priorities = learner.update(sample)
    assert np.isfinite(loss) and priorities.shape == (32,)


def test_a_rainbow_policy_on_small_images_exports_and_serves_the_same_expected_values(tmp_path):
    """Small CNN, C51 and noisy layers: the served Q-values are the atoms' expectations
    under the mean weights, and the ONNX graph takes the grids as bytes and agrees."""
    registry = ModelRegistry(str(tmp_path / "store"))
    spec = NetworkSpec(
        [10, 10, 4],
        3,
        [32],
        True,
        torso="small_cnn",
        obs_dtype="bool",
        num_atoms=21,
        v_min=-2,
        v_max=8,
        noisy=True,
    )
    register_network(registry, "breakout", spec)
    served = DQNPolicy(registry, "breakout", 1)
    grids = np.random.default_rng(0).random((64, 10, 10, 4)) > 0.8
    answer = served.act(grids.astype(np.float32))
    with torch.no_grad():
        probs = served.network.logits(torch.from_numpy(grids)).softmax(2)
        expected = (probs * torch.linspace(-2, 8, 21)).sum(2).numpy()
    np.testing.assert_allclose(answer["q_values"], expected, atol=1e-5)
    assert answer == served.act(grids.astype(np.float32))  # means, not noise
    assert export(registry, "breakout", "1", str(tmp_path / "out")) == 0
    described = json.loads((tmp_path / "out" / "model.json").read_text())
    assert described["inputs"][0]["datatype"] == "UINT8"
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "policy.onnx"))
    actions, q_values = session.run(None, {"observations": grids.astype(np.uint8)})
    np.testing.assert_allclose(q_values, expected, atol=TOLERANCE)


@pytest.mark.slow
def test_rainbow_on_minatar_through_the_pipeline_registers_a_policy_that_plays(
    ray_session, tmp_path
):
    """The whole pipeline on MinAtar Breakout with every Rainbow part on (C51, noisy
    nets, dueling, double, 3-step, prioritised): the env package is loaded in each
    actor, the collectors act on noise without epsilon, and the registered policy is
    the evaluated one."""
    cfg = from_dict(
        DQNConfig,
        {
            "env": {
                "id": "MinAtar/Breakout-v1",
                "package": "minatar.gym:register_envs",
                "num_envs_per_collector": 4,
            },
            "network": {"hidden_sizes": [32], "noisy": True},
            "learner": {
                "num_atoms": 21,
                "v_min": 0,
                "v_max": 10,
                "learning_starts_env_steps": 300,
                "batches_per_fetch": 4,
                "batch_size": 32,
            },
            "collectors": {"num_collectors": 1, "env_steps_per_call": 64},
            "eval": {"every_env_steps": 500, "episodes": 3, "solved_return": None},
            "run": {
                "name": "breakout",
                "total_env_steps": 1000,
                "seed": 2,
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
            },
        },
    )
    outcome = pipelines.run(pipelines.get_pipeline("dqn"), cfg, sweep=False)
    best, version = outcome.best, outcome.version
    assert best.metrics["env_steps_sampled"] >= 1000 and best.metrics["learner_updates"] > 0
    registry = ModelRegistry(str(tmp_path / "store"))
    network = json.loads(registry.read_file(version, "network.json"))
    assert network["torso"] == "small_cnn" and network["obs_dtype"] == "bool"
    assert network["num_atoms"] == 21 and network["noisy"] is True
    assert version.metrics["registered_eval_episodes"] == 3
    assert version.metrics["registered_eval_return"] >= 0
    answer = DQNPolicy(registry, "breakout", version.version).act(np.zeros((2, 10, 10, 4)))
    assert len(answer["actions"]) == 2 and all(0 <= q <= 10 for q in answer["q_values"][0])
