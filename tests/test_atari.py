"""Atari from pixels: the preprocessing, frames sent and stored once, and the Pong
pipeline end to end (a short smoke: learning Pong takes hours of a GPU)."""

import io
import json

import numpy as np
import pytest
import torch

from rayline import pipelines
from rayline.drift import build_profile
from rayline.rl.collector import Collector, FrameTracker, true_next_obs
from rayline.rl.config import NetworkSpec
from rayline.rl.envs import EnvSpec, make_vector_env
from rayline.rl.networks import build_q_network
from rayline.rl.predictor import FRAME_FEATURES, DQNPolicy, observation_features
from rayline.rl.replay import FrameTransitions, ReplayBuffer
from rayline.store import ModelRegistry

pytest.importorskip("ale_py", reason="the atari extra (pip install 'rayline[atari]')")

# 200 raw frames = 50 agent steps (frame skip 4): episodes end often, by truncation.
PONG = EnvSpec("ALE/Pong-v5", atari=True, max_episode_steps=200)


def stack_of(tracker: FrameTracker, numbers: np.ndarray) -> np.ndarray:
    return np.stack([tracker.frames[int(n)] for n in numbers])


def test_frame_numbers_rebuild_the_envs_own_stacks_across_episode_ends():
    env = make_vector_env(PONG, 3)
    obs, _ = env.reset(seed=0)
    tracker = FrameTracker(obs)
    rng = np.random.default_rng(0)
    episode_ends = 0
    for _ in range(130):
        for e in range(3):
            assert np.array_equal(stack_of(tracker, tracker.stacks[e]), obs[e])
        obs, _, terminated, truncated, info = env.step(rng.integers(0, 6, 3))
        done = terminated | truncated
        expected_next = true_next_obs(obs, done, info)
        next_numbers = tracker.step(obs, done, info)
        for e in range(3):
            assert np.array_equal(stack_of(tracker, next_numbers[e]), expected_next[e])
        episode_ends += int(done.sum())
    env.close()
    assert episode_ends >= 6
    assert len(tracker.frames) <= 130 * 3 + 3 * (episode_ends + 1)  # one per step, not four


def test_a_lost_life_ends_the_training_episode_but_not_the_game():
    env = make_vector_env(EnvSpec("ALE/Breakout-v5", atari=True), 1)
    env.reset(seed=0)
    ale = env.envs[0].unwrapped.ale
    rng = np.random.default_rng(0)
    for _ in range(5000):
        _, rewards, terminated, truncated, _ = env.step(rng.integers(0, 4, 1))
        assert np.all(np.abs(rewards) <= 1)  # clipped for training
        if terminated[0]:
            break
    assert terminated[0], "no life was lost in 5,000 steps"
    assert 0 < ale.lives() < 5  # the same game goes on after the training episode's end
    env.close()
    evaluation = make_vector_env(EnvSpec("ALE/Breakout-v5", atari=True), 1, training=False)
    evaluation.reset(seed=0)
    lives_seen = set()
    for _ in range(5000):
        _, _, terminated, truncated, _ = evaluation.step(rng.integers(0, 4, 1))
        if terminated[0] or truncated[0]:
            break
        lives_seen.add(evaluation.envs[0].unwrapped.ale.lives())
    # evaluation plays through lost lives: its episode is the whole game
    assert terminated[0] and lives_seen == {1, 2, 3, 4, 5}
    evaluation.close()


def test_pong_collector_sends_each_frame_once_and_the_replay_stores_it_once():
    network = NetworkSpec([4, 84, 84], 6, [64], True)
    collector = Collector(
        PONG, network, num_envs=2, epsilons=[1.0, 1.0], n_step=3, gamma=0.99, seed=0
    )
    batch, stats = collector.collect(400)
    assert isinstance(batch, FrameTransitions)
    assert batch.frames.dtype == np.uint8 and batch.frames.shape[1:] == (84, 84)
    count = len(batch.actions)
    assert len(batch.frames) <= count + 2 * (3 + 3) + 2 * 8 * 2  # + stack/n-step carry, resets
    assert len(collector.frames.frames) <= 2 * (3 + 4 + 1) * 2  # only what later calls need
    replay = ReplayBuffer(2000, (4, 84, 84), np.uint8, prioritized=True, frames=True)
    replay.add(batch)
    replay.add(collector.collect(400)[0])
    replay.check_valid()
    assert replay.memory()["bytes_per_transition"] <= 1.2 * 84 * 84
    sample = replay.sample(256)
    # Whole 3-step transitions: the next stack is the stack 3 frames on.
    whole = sample.discounts == np.float32(0.99**3)
    assert whole.sum() > 100
    assert np.array_equal(sample.next_obs[whole, 0], sample.obs[whole, 3])


def test_an_int8_pong_collector_acts_with_the_weights_it_is_sent():
    network = NetworkSpec([4, 84, 84], 6, [64], True)
    collector = Collector(
        PONG, network, num_envs=4, epsilons=[0.0] * 4, n_step=3, gamma=0.99, inference="int8"
    )
    collector.collect(64)
    torch.manual_seed(1)
    policy = build_q_network(network).eval()
    collector.load_weights({k: v.numpy() for k, v in policy.state_dict().items()})
    _, stats = collector.collect(64)  # greedy, in int8, on real frames
    assert stats.env_steps == 64
    frames = torch.as_tensor(collector.obs)
    with torch.inference_mode():
        expected = policy(frames)
    assert (collector.policy.int8(frames) - expected).abs().max() <= 0.03 * expected.abs().max()


def test_frame_features_of_hand_made_stacks():
    stacks = np.zeros((2, 4, 84, 84), dtype=np.uint8)
    stacks[0, -1] = 255  # a white frame after a black one
    stacks[1, -2] = 255
    stacks[1, -1, :42] = 255  # its lower half went black
    rows, names = observation_features(stacks)
    assert names == FRAME_FEATURES == ["brightness", "contrast", "motion"]
    np.testing.assert_allclose(rows, [[1.0, 0.0, 1.0], [0.5, 0.5, 0.5]], atol=1e-6)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    rows, names = observation_features(vectors)
    assert names == ["obs[0]", "obs[1]", "obs[2]"] and rows is vectors


def test_a_pong_policy_watches_its_frames_for_drift(tmp_path):
    """Real Pong stacks: the ones like the reference's stay calm; the same screens with
    their grey levels inverted drift on brightness."""
    env = make_vector_env(PONG, 2)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    stacks = []
    for _ in range(600):
        stacks.append(obs)
        obs, *_ = env.step(rng.integers(0, 6, 2))
    env.close()
    stacks = np.stack(stacks)  # steps x envs x frames x 84 x 84
    # Alternate steps of both games: the same distribution.
    reference, served = (stacks[start::2].reshape(-1, 4, 84, 84) for start in (0, 1))
    network = NetworkSpec([4, 84, 84], 6, [64], True)
    torch.manual_seed(0)
    policy = build_q_network(network).eval()
    with torch.inference_mode():
        actions = policy(torch.as_tensor(reference)).argmax(1).numpy()
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    profile = build_profile(
        observation_features(reference)[0], FRAME_FEATURES, actions, list(range(6))
    )
    files = {
        "policy.pt": buffer.getvalue(),
        "network.json": json.dumps(network.__dict__).encode(),
        "profile.json": json.dumps(profile).encode(),
    }
    registry = ModelRegistry(str(tmp_path / "store"))
    registry.register("pong", files, kind="dqn", metrics={})
    served_policy = DQNPolicy(registry, "pong", 1)
    for batch in np.array_split(served, 10):
        served_policy.act(batch.astype(np.float32))
    calm = served_policy.drift.report()
    assert calm["window"] == 600 and calm["max_psi"] < 0.1, calm
    for batch in np.array_split(255 - served, 10):
        served_policy.act(batch.astype(np.float32))
    inverted = served_policy.drift.report()
    assert inverted["features"]["brightness"] > 0.25 and inverted["drifted"], inverted


@pytest.mark.slow
def test_the_pong_pipeline_runs_end_to_end(ray_session, tmp_path):
    """pipelines/dqn-pong.yaml as shipped, shrunk to this machine: pixels through
    collectors, the frame replay in 2 shards, the conv learner, evaluation on whole
    (time-limited) games, a checkpoint and the registered policy."""
    pipeline, cfg = pipelines.load_pipeline(
        "pipelines/dqn-pong.yaml",
        {
            "env.num_envs_per_collector": 2,
            "env.max_episode_steps": 1200,
            "replay.capacity": 4000,
            "replay.shards": 2,
            "learner.num_gpus": 0,
            "learner.batch_size": 16,
            "learner.batches_per_fetch": 2,
            "learner.learning_starts_env_steps": 400,
            "collectors.num_collectors": 2,
            "collectors.num_cpus": 0.5,
            "collectors.env_steps_per_call": 64,
            "eval.every_env_steps": 1000,
            "eval.episodes": 1,
            "run.total_env_steps": 1200,
            "run.checkpoint_every_env_steps": 1000,
            "learner.num_cpus": 0.5,
            "run.storage_path": str(tmp_path / "results"),
            "run.store_uri": str(tmp_path / "store"),
        },
    )
    outcome = pipelines.run(pipeline, cfg, sweep=False)
    metrics = outcome.best.metrics
    assert metrics["env_steps_sampled"] >= 1200
    assert metrics["learner_updates"] > 0 and metrics["evaluations"] >= 1
    assert -21 <= metrics["eval_return_mean"] <= 21
    assert outcome.version.version == 1
    # Its drift reference: the frames' features in registration's own games, the actions.
    registry = ModelRegistry(str(tmp_path / "store"))
    profile = json.loads(registry.read_file(outcome.version, "profile.json"))
    assert list(profile["features"]) == FRAME_FEATURES and profile["rows"] >= 100, profile
    assert profile["outputs"]["classes"] == list(range(6))
