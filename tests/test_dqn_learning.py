"""DQN learns the right values, and the distributed pipeline runs end to end on Ray."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import oracles
from rayline import pipelines
from rayline.config import from_dict
from rayline.family import CONSOLE_KEY
from rayline.rl.apex import run_dqn
from rayline.rl.bookkeeping import Evaluations
from rayline.rl.checkpoint import EVALUATED_FILE, STATE_FILE
from rayline.rl.collector import Collector
from rayline.rl.config import DQNConfig, LearnerConfig, NetworkSpec
from rayline.rl.envs import EnvSpec
from rayline.rl.learner import Learner
from rayline.rl.limiter import RateLimiter
from rayline.rl.replay import ReplayBuffer
from rayline.store import ModelRegistry
from rayline.testing import CHAIN_ENV_ID, chain_q_star


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_learner_fed_by_the_replay_converges_to_closed_form_q_star(precision):
    length, gamma = 5, 0.9
    spec = NetworkSpec([length], 2, [32], dueling=False)
    # Uniformly random behaviour (epsilon 1) visits every state-action pair of the chain.
    collector = Collector(
        EnvSpec(CHAIN_ENV_ID), spec, num_envs=4, epsilons=[1.0] * 4, n_step=1, gamma=gamma
    )
    batch, stats = collector.collect(2000)
    assert stats.episode_returns and set(stats.episode_returns) == {0.0, 1.0}
    replay = ReplayBuffer(5000, (length,), np.float32, prioritized=True, seed=0)
    replay.add(batch)
    learner = Learner(
        spec,
        LearnerConfig(
            lr=3e-3,
            gamma=gamma,
            double_q=True,
            target_sync_every_updates=50,
            tau=1.0,
            grad_clip_norm=10.0,
            device="cpu",
            precision=precision,
        ),
        seed=0,
    )
    for _ in range(2500):
        sample = replay.sample(64, beta=0.4)
        _, td = learner.update(sample)
        replay.update_priorities(sample.indices, td)
    replay.check_valid()
    states = torch.eye(length)[: length - 1]
    with torch.no_grad():
        q = learner.policy(states).numpy()
    assert np.abs(q - chain_q_star(length, gamma)).max() < 0.05, q


def tiny_config(tmp_path, **run):
    return from_dict(
        DQNConfig,
        {
            "pipeline": "dqn",
            "env": {"id": "CartPole-v1", "num_envs_per_collector": 4},
            "network": {"hidden_sizes": [32, 32]},
            "learner": {
                "learning_starts_env_steps": 200,
                "batches_per_fetch": 8,
                "target_sync_every_updates": 50,
            },
            "collectors": {
                "num_collectors": 2,
                "env_steps_per_call": 64,
                "epsilon_decay_env_steps": 500,
            },
            # Runs go to their budget: a lucky early solve (seen in CI at 4,160 and 4,672
            # env steps) would end one before what its test counts on.
            "eval": {"every_env_steps": 500, "episodes": 3, "solved_return": None},
            "run": {
                "name": "tiny",
                "total_env_steps": 1500,
                "checkpoint_every_env_steps": 1000,
                "seed": 1,
                "storage_path": str(tmp_path / "results"),
                "store_uri": str(tmp_path / "store"),
                "report_every_s": 1.0,
                **run,
            },
        },
    )


@pytest.mark.slow
def test_pipeline_through_tune_checkpoints_and_registers(ray_session, tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.run.promote = "gated"  # the first version: no holder to compare with, promoted
    outcome = pipelines.run(pipelines.get_pipeline("dqn"), cfg, sweep=False)
    best, version = outcome.best, outcome.version
    assert outcome.promotion == "production -> tiny v1 (no holder to compare with)"
    assert best.metrics["env_steps_sampled"] >= 1500
    assert best.metrics["learner_updates"] > 0 and best.metrics["target_syncs"] >= 1
    assert best.metrics["evaluations"] >= 3
    with best.checkpoint.as_directory() as directory:
        state = json.loads(Path(directory, STATE_FILE).read_text())
        assert state["counters"]["env_steps_sampled"] == best.metrics["env_steps_sampled"]
        assert state["config"]["run"]["name"] == "tiny"
    events = [
        os.path.join(root, f)
        for root, _, files in os.walk(best.path)
        for f in files
        if f.startswith("events.out.tfevents")
    ]
    assert events, "Tune wrote no TensorBoard event files"
    # Curves, not dots: the loss has a point at several env-step counts.
    steps = tensorboard_steps(events[0], "ray/tune/loss")
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] >= 1500, steps

    registry = ModelRegistry(str(tmp_path / "store"))
    assert version.version == 1 and registry.get("tiny").kind == "dqn"
    policy = torch.load(io.BytesIO(registry.read_file(version, "policy.pt")), weights_only=True)
    network = json.loads(registry.read_file(version, "network.json"))
    assert network["obs_shape"] == [4] and network["n_actions"] == 2
    from rayline.rl.networks import build_q_network

    net = build_q_network(NetworkSpec(**network))
    net.load_state_dict(policy)  # the registered weights rebuild the policy exactly
    assert version.metrics["eval_return_mean"] == best.metrics["eval_return_mean"]
    # What is registered is what an evaluation scored: the checkpoint's evaluated
    # weights, byte for byte, evaluated again on fresh seeds at registration.
    with best.checkpoint.as_directory() as directory:
        assert Path(directory, EVALUATED_FILE).read_bytes() == registry.read_file(
            version, "policy.pt"
        )
    assert version.metrics["evaluated_return_mean"] == best.metrics["kept_eval_return"]
    assert version.metrics["registered_eval_episodes"] == cfg.eval.episodes
    assert 0 < version.metrics["registered_eval_return"] <= 500
    # Exported to ONNX, the pipeline's policy gives the served Q-values and actions.
    from test_export import assert_policy_parity, export

    assert export(registry, "tiny", "1", str(tmp_path / "onnx")) == 0
    assert_policy_parity(registry, "tiny", 1, tmp_path / "onnx")


def tensorboard_steps(path: str, tag: str) -> list[int]:
    """The steps at which an event file holds `tag`: TFRecords of Event protos."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    steps = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = Event.FromString(f.read(length))
            f.read(4)  # the data's crc
            if any(value.tag == tag for value in event.summary.value):
                steps.append(event.step)
    return steps


def test_evaluations_keep_the_weights_of_the_best_or_the_last():
    best = Evaluations("best", solved_return=475.0)
    best.add(1000, [20.0, 30.0], 1.0, "w1")
    best.add(2000, [400.0, 500.0], 2.0, "w2")
    best.add(3000, [100.0, 120.0], 3.0, "w3")  # the policy swung after its best
    assert best.kept_weights == "w2" and best.kept["env_steps"] == 2000
    assert best.kept["return_mean"] == 450.0 and not best.solved
    assert best.metrics()["best_eval_return"] == 450.0
    assert best.metrics()["eval_return_mean"] == 110.0

    last = Evaluations("last", solved_return=None)
    for steps, weights in ((1000, "w1"), (2000, "w2"), (3000, "w3")):
        last.add(steps, [float(steps)], 0.0, weights)
    assert last.kept_weights == "w3" and not last.solved

    # Solved only when confirmed: the same weights again on fresh seeds.
    solved = Evaluations(True, solved_return=475.0)
    lucky = solved.add(1000, [490.0, 490.0], 0.0, "w1")
    assert solved.reaches_solved(lucky) and not solved.solved
    assert not solved.confirm(lucky, [470.0, 474.0], "w1") and not solved.solved
    assert solved.metrics()["confirmations"] == 1 and solved.kept_weights == "w1"
    # A mean over the line is not enough when the episodes spread: 480 +- 12.2 on four
    # episodes is 480 - 2 x 6.1 = 467.8 at its lower bound.
    spread = solved.add(1500, [490.0, 490.0], 0.0, "w1b")
    assert not solved.confirm(spread, [470.0, 470.0, 490.0, 490.0], "w1b") and not solved.solved
    assert spread["confirmed_lower_bound"] == pytest.approx(
        480.0 - 2 * np.std([470, 470, 490, 490], ddof=1) / 2
    )
    steady = solved.add(2000, [480.0, 480.0], 0.0, "w2")
    assert solved.confirm(steady, [477.0, 478.0, 477.0, 478.0], "w2") and solved.solved
    # What is registered is the confirmed policy, not the lucky one that scored higher.
    assert solved.kept_weights == "w2" and solved.kept["confirmed_return_mean"] == 477.5
    assert solved.metrics()["confirmed_return_mean"] == 477.5


def test_a_run_stops_as_solved_only_once_an_evaluation_is_confirmed(ray_session, tmp_path):
    """A solved return any policy reaches (CartPole's episodes last 8+ steps): the first
    evaluation reaches it, the same weights are played again on fresh seeds, and the run
    stops as solved after that confirmation, well before its budget."""
    cfg = tiny_config(tmp_path, total_env_steps=20_000)
    cfg.eval.solved_return = 8.0
    cfg.eval.confirm_z = 0.0  # the mean alone: greedy episode lengths of a fresh network spread
    said: list[str] = []
    result = run_dqn(cfg, lambda metrics, _: said.extend(metrics.get(CONSOLE_KEY, "").splitlines()))
    assert result["solved"] and result["confirmations"] == 1
    assert result["confirmed_return_mean"] >= 8.0
    assert result["env_steps_sampled"] < 20_000
    assert "fresh episodes" in result["stop_reason"], result["stop_reason"]
    assert any(line.startswith("stopped: solved") for line in said), said


@pytest.mark.slow
def test_the_registered_policy_solves_cartpole_on_fresh_seeds(ray_session, tmp_path):
    import gymnasium as gym

    pipeline, cfg = pipelines.load_pipeline(
        "pipelines/dqn-cartpole.yaml",
        {
            "run.storage_path": str(tmp_path / "results"),
            "run.store_uri": str(tmp_path / "store"),
            "run.max_wall_s": 400,
        },
    )
    outcome = pipelines.run(pipeline, cfg, sweep=False)
    version = outcome.version
    # Solved means confirmed: an evaluation at 475 or more (one can be lucky: seen 497.1
    # evaluated, 461 on fresh seeds), then the same weights again on 100 fresh seeds, kept
    # and registered. Registration's own 20 fresh episodes decide its `solved` flag; a
    # policy whose true mean is 480 with a wide spread falls under 475 on 20 episodes
    # now and then (seen once in a full run: 465.1 after a confirmation at 478.8), so
    # the claim checked below is gym's own criterion on the pooled fresh episodes.
    assert version.metrics["confirmations"] >= 1, version.metrics
    assert version.metrics["evaluated_return_mean"] >= 475, version.metrics
    assert version.metrics["confirmed_return_mean"] >= 475, version.metrics
    assert version.metrics["solved"] == (version.metrics["registered_eval_return"] >= 475)

    registry = ModelRegistry(str(tmp_path / "store"))
    state = torch.load(io.BytesIO(registry.read_file(version, "policy.pt")), weights_only=True)
    network = json.loads(registry.read_file(version, "network.json"))
    # The drift reference: what the policy saw and did in registration's own episodes.
    profile = json.loads(registry.read_file(version, "profile.json"))
    assert list(profile["features"]) == ["obs[0]", "obs[1]", "obs[2]", "obs[3]"]
    assert profile["outputs"]["classes"] == [0, 1] and sum(profile["outputs"]["shares"]) == 1.0
    assert profile["rows"] >= 20 * 475  # 20 episodes of a solving policy
    # 100 episodes no evaluation of the run used, played side by side: one batched
    # forward pass per step of all that still play (one at a time took 8-12 s of the test).
    envs = [gym.make("CartPole-v1") for _ in range(100)]
    observations = [env.reset(seed=123_456 + i)[0] for i, env in enumerate(envs)]
    returns, playing = [0.0] * len(envs), list(range(len(envs)))
    while playing:
        with torch.no_grad():
            batch = torch.as_tensor(np.stack([observations[i] for i in playing]))
            actions = oracles.q_values(state, network, batch).argmax(dim=1).tolist()
        still = []
        for i, action in zip(playing, actions):
            observations[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            if not (terminated or truncated):
                still.append(i)
        playing = still
    # CartPole-v1 is solved at a mean of 475 over 100 consecutive episodes: here 100 of
    # this test's and registration's 20 more, all on seeds no evaluation of the run played.
    registered = version.metrics["registered_eval_episodes"]  # 20
    pooled = (sum(returns) + registered * version.metrics["registered_eval_return"]) / (
        len(returns) + registered
    )
    assert pooled >= 475, (pooled, returns, version.metrics["registered_eval_return"])


def limiter(**overrides) -> RateLimiter:
    settings = dict(
        ratio=0.5,
        learning_starts=1000,
        warmup_transitions=1000,
        updates_per_call=16,
        steps_per_call=256,
        num_collectors=2,
    )
    return RateLimiter(**{**settings, **overrides})


def test_rate_limiter_holds_collectors_and_learner_to_the_replay_ratio():
    """A driver with instant actors, as fast as the limiter lets each side go: the
    learner never runs ahead of ratio x (env steps - learning starts), and collectors
    never more than one call each ahead of what the learner has consumed."""
    rate = limiter()
    env_steps = updates = replay = 0
    assert not rate.learner_may_start(env_steps, updates, replay)  # nothing to learn from
    for _ in range(2000):
        if rate.learner_may_start(env_steps, updates, replay):
            updates += rate.updates_per_call
        elif rate.collector_may_start(env_steps, updates, replay):
            rate.collecting()
            rate.collected()
            env_steps += rate.steps_per_call
            replay += rate.steps_per_call
        else:
            raise AssertionError("stalled: neither side may start")
        assert updates <= max(0, (env_steps - 1000) * 0.5) + rate.updates_per_call
        if replay >= 1000:
            slack = rate.steps_per_call * rate.num_collectors + rate.steps_per_call
            assert env_steps <= 1000 + updates / 0.5 + slack
    assert updates / (env_steps - 1000) == pytest.approx(0.5, rel=0.05)


def test_rate_limiter_lets_a_resumed_run_refill_its_replay_first():
    rate = limiter()
    # resumed at 50k env steps and 24.5k updates, without the replay in its checkpoint
    assert rate.collector_may_start(50_000, 24_500, replay_size=0)
    assert not rate.learner_may_start(50_000, 24_500, replay_size=0)
    rate.collecting()
    rate.collecting()
    assert rate.steps_in_flight == 512
    assert rate.learner_may_start(50_000, 24_500, replay_size=1000)


def test_rate_limiter_refills_a_lost_replay_despite_calls_that_never_return():
    """A node with collectors and the replay is lost: the replay is rebuilt empty and the
    lost collectors' calls stay in flight for ever (Ray retries them until a node with
    their resources joins). The collectors left must refill the replay for the learner."""
    rate = limiter()
    for _ in range(4):
        rate.collecting()  # two of them on the lost node
    assert not rate.learner_may_start(20_000, 9_000, replay_size=300)
    assert rate.collector_may_start(20_000, 9_000, replay_size=300)
