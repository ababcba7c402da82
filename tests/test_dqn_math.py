"""DQN's math on hand-computed answers."""

import numpy as np
import pytest
import torch

from rayline.rl import dqn, exploration
from rayline.rl.acting import NumpyMLPPolicy
from rayline.rl.collector import NStepBuilder
from rayline.rl.config import LearnerConfig, NetworkSpec
from rayline.rl.learner import Learner
from rayline.rl.networks import Int8ActingNetwork, build_q_network
from rayline.rl.replay import SampledBatch


@pytest.mark.blas
def test_bellman_target_nature_and_double():
    rewards = torch.tensor([1.0, 0.5])
    discounts = torch.tensor([0.9, 0.0])  # second transition terminated
    next_q_target = torch.tensor([[2.0, 5.0], [7.0, 1.0]])
    next_q_online = torch.tensor([[3.0, 1.0], [0.0, 9.0]])
    # Nature DQN: max of the target net.  1 + 0.9 * 5 ; 0.5 + 0 * 7
    assert torch.allclose(
        dqn.bellman_target(rewards, discounts, next_q_target), torch.tensor([5.5, 0.5])
    )
    # Double DQN: online picks action 0 -> target values 2.0 ; terminated stays 0.5
    assert torch.allclose(
        dqn.bellman_target(rewards, discounts, next_q_target, next_q_online),
        torch.tensor([2.8, 0.5]),
    )


def test_huber_loss_values():
    predicted = torch.tensor([0.0, 0.0, 0.0])
    target = torch.tensor([0.5, 2.0, -3.0])
    # 0.5 * 0.5^2 = 0.125 ; |2| - 0.5 = 1.5 ; |3| - 0.5 = 2.5
    assert dqn.huber_loss(predicted, target).item() == pytest.approx((0.125 + 1.5 + 2.5) / 3)
    weights = torch.tensor([1.0, 0.0, 2.0])
    assert dqn.huber_loss(predicted, target, weights).item() == pytest.approx((0.125 + 5.0) / 3)


def test_n_step_transitions_termination_vs_truncation():
    rewards = np.array([1.0, 2.0, 3.0])
    g = 0.5
    terminated = dqn.n_step_transitions(rewards, terminated=True, gamma=g, n=2)
    assert terminated == [
        (0, 1 + 0.5 * 2, 2, 0.25),  # bootstraps from state 2 with gamma^2
        (1, 2 + 0.5 * 3, 3, 0.0),  # reaches the terminal state: no bootstrap
        (2, 3.0, 3, 0.0),
    ]
    truncated = dqn.n_step_transitions(rewards, terminated=False, gamma=g, n=2)
    assert truncated[1] == (1, 3.5, 3, 0.25)  # time limit: bootstrap from the final obs
    assert truncated[2] == (2, 3.0, 3, 0.5)


def run_builder(episodes, n, gamma):
    """Feed one env's episodes [(rewards, terminated)] through NStepBuilder; observations
    are the global step index so transitions can be read back."""
    builder = NStepBuilder(num_envs=1, obs_shape=(1,), obs_dtype=np.float32, n=n, gamma=gamma)
    out, t = [], 0
    for rewards, terminated in episodes:
        for i, r in enumerate(rewards):
            last = i == len(rewards) - 1
            built = builder.step(
                obs=np.array([[t]], np.float32),
                actions=np.array([i % 2]),
                rewards=np.array([r]),
                next_obs=np.array([[t + 1]], np.float32),
                terminated=np.array([last and terminated]),
                truncated=np.array([last and not terminated]),
            )
            if built is not None:
                out += [
                    (int(o[0]), int(a), float(rew), int(no[0]), float(d))
                    for o, a, rew, no, d in zip(*built)
                ]
            t += 1
        t += 100  # a gap between episodes
    return sorted(out)


def test_n_step_builder_matches_hand_computed_episodes():
    g = 0.5
    got = run_builder([([1.0, 2.0, 3.0], True), ([4.0, 5.0], False)], n=2, gamma=g)
    assert got == [
        # (obs step, action, n-step return, bootstrap obs, discount)
        (0, 0, 2.0, 2, 0.25),
        (1, 1, 3.5, 3, 0.0),
        (2, 0, 3.0, 3, 0.0),
        (103, 0, 4 + 0.5 * 5, 105, 0.25),  # truncated: bootstraps from the final obs
        (104, 1, 5.0, 105, 0.5),
    ]
    for n in (1, 3, 4):
        rewards = [1.0, -1.0, 2.0, 0.5, 3.0]
        expected = [
            (s, s % 2, pytest.approx(r), e, pytest.approx(d))
            for s, r, e, d in dqn.n_step_transitions(
                np.array(rewards), terminated=True, gamma=0.9, n=n
            )
        ]
        assert run_builder([(rewards, True)], n=n, gamma=0.9) == expected


def test_n_step_builder_keeps_envs_apart():
    builder = NStepBuilder(num_envs=2, obs_shape=(1,), obs_dtype=np.float32, n=2, gamma=1.0)
    obs = np.array([[0.0], [10.0]], np.float32)
    first = builder.step(
        obs,
        np.array([0, 1]),
        np.array([1.0, 5.0]),
        obs + 1,
        terminated=np.array([True, False]),
        truncated=np.array([False, False]),
    )
    assert (
        first.obs.tolist() == [[0.0]]
        and first.rewards.tolist() == [1.0]
        and first.discounts.tolist() == [0.0]
    )
    second = builder.step(
        obs + 1,
        np.array([1, 1]),
        np.array([2.0, 7.0]),
        obs + 2,
        terminated=np.array([False, False]),
        truncated=np.array([False, False]),
    )
    assert second.obs.tolist() == [[10.0]] and second.rewards.tolist() == [12.0]
    assert second.next_obs.tolist() == [[12.0]] and second.discounts.tolist() == [1.0]


def test_epsilon_ladder_values():
    assert exploration.epsilon_ladder(0, 8) == pytest.approx(0.4)
    assert exploration.epsilon_ladder(7, 8) == pytest.approx(0.4**8)
    assert exploration.epsilon_ladder(3, 8) == pytest.approx(0.4 ** (1 + 7 * 3 / 7))
    assert exploration.epsilon_ladder(0, 1) == pytest.approx(0.4)
    values = [exploration.epsilon_ladder(i, 16) for i in range(16)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError):
        exploration.epsilon_ladder(8, 8)
    assert exploration.linear_schedule(0, 1.0, 0.1, 100) == 1.0
    assert exploration.linear_schedule(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert exploration.linear_schedule(500, 1.0, 0.1, 100) == 0.1


def make_learner(**overrides):
    settings = dict(
        lr=1e-2,
        gamma=0.9,
        double_q=True,
        target_sync_every_updates=3,
        tau=1.0,
        grad_clip_norm=10.0,
        device="cpu",
    )
    settings.update(overrides)
    return Learner(NetworkSpec([3], 2, [16], dueling=False), LearnerConfig(**settings))


def random_batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    return SampledBatch(
        rng.normal(size=(size, 3)).astype(np.float32),
        rng.integers(0, 2, size),
        rng.normal(size=size).astype(np.float32),
        rng.normal(size=(size, 3)).astype(np.float32),
        np.full(size, 0.9, np.float32),
        np.ones(size, np.float32),
        np.arange(size),
    )


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_target_sync_counts_learner_updates():
    learner = make_learner(target_sync_every_updates=3)
    synced_after = []
    for update in range(1, 10):
        learner.update(random_batch(seed=update))
        if same_weights(learner.policy, learner.target):
            synced_after.append(update)
    assert synced_after == [3, 6, 9]
    assert learner.target_syncs == 3 and learner.learner_updates == 9


def stacked(batches):
    return SampledBatch(*(np.stack(field) for field in zip(*batches)))


@pytest.mark.blas
def test_a_stacked_fetch_takes_the_same_steps_as_one_update_per_batch():
    """The learner actor's path (a fetch moved at once, one read-back) is the same
    sequence of updates as one `update` per batch."""
    one_by_one, at_once = make_learner(), make_learner()
    batches = [random_batch(seed=seed) for seed in range(5)]
    results = [one_by_one.update(batch) for batch in batches]
    losses, td_errors = at_once.update_stacked(stacked(batches))
    np.testing.assert_allclose(losses, [loss for loss, _ in results], rtol=1e-6)
    np.testing.assert_allclose(td_errors, np.stack([td for _, td in results]), rtol=1e-6)
    assert same_weights(one_by_one.policy, at_once.policy)
    assert same_weights(one_by_one.target, at_once.target)
    assert at_once.learner_updates == 5 and at_once.target_syncs == 1


@pytest.mark.slow
def test_a_compiled_learner_takes_the_same_steps_as_the_eager_one():
    eager, compiled = make_learner(), make_learner(compile=True)
    batches = [random_batch(seed=seed) for seed in range(4)]
    eager_losses, eager_td = eager.update_stacked(stacked(batches))
    losses, td_errors = compiled.update_stacked(stacked(batches))
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(td_errors, eager_td, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.policy.parameters(), compiled.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.blas
def test_bfloat16_steps_stay_near_the_float32_ones():
    """Autocast runs the networks in bfloat16; the loss and TD errors come back float32
    and within bfloat16's rounding of the float32 learner's."""
    full, half = make_learner(), make_learner(precision="bfloat16")
    loss_full, td_full = full.update(random_batch(size=64))
    loss_half, td_half = half.update(random_batch(size=64))
    assert td_half.dtype == np.float32
    assert abs(loss_half - loss_full) <= 0.02 * abs(loss_full)
    np.testing.assert_allclose(td_half, td_full, atol=0.03)


def test_polyak_update_moves_target_by_tau():
    online, target = (
        build_q_network(NetworkSpec([3], 2, [4], False)),
        build_q_network(NetworkSpec([3], 2, [4], False)),
    )
    before = [p.clone() for p in target.parameters()]
    dqn.polyak_update(target, online, tau=0.25)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * o)


@pytest.mark.blas
def test_dueling_head_is_value_plus_centred_advantage():
    net = build_q_network(NetworkSpec([3], 4, [8, 8], dueling=True))
    x = torch.randn(5, 3)
    features = net.body(x)
    advantage = net.head.advantage(features)
    value = net.head.value(features)
    assert torch.allclose(net(x), value + advantage - advantage.mean(1, keepdim=True))


@pytest.mark.blas
@pytest.mark.parametrize(
    "hidden_sizes, dueling", [([8], False), ([16, 8], True), ([32, 16, 8], False)]
)
def test_numpy_acting_copy_gives_the_torch_networks_q_values(hidden_sizes, dueling):
    """The collectors' and evaluator's numpy forward pass is the learner's MLP: the same
    Q-values from the same state_dict, the same greedy actions wherever the margin
    between the two best actions exceeds float32 rounding."""
    torch.manual_seed(0)
    spec = NetworkSpec([5], 3, hidden_sizes, dueling)
    network = build_q_network(spec).eval()
    policy = NumpyMLPPolicy(spec)
    policy.load({k: v.numpy() for k, v in network.state_dict().items()}, np.empty(0))
    obs = np.random.default_rng(0).normal(0, 2, (256, 5)).astype(np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(policy.q_values(obs), expected, rtol=1e-5, atol=1e-5)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() >= 200
    np.testing.assert_array_equal(policy.greedy(obs)[clear], expected.argmax(1)[clear])


def test_numpy_acting_copy_starts_like_a_fresh_torch_network_and_follows_new_weights():
    spec = NetworkSpec([4], 2, [64, 64], True)
    policy = NumpyMLPPolicy(spec, seed=3)
    bound = 1 / np.sqrt(4)  # torch's default Linear init: U(-1/sqrt(fan_in), ...)
    first_weight = policy.body[0][0]
    assert first_weight.shape == (4, 64) and np.abs(first_weight).max() <= bound
    assert np.abs(first_weight).max() > 0.9 * bound
    obs = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    torch.manual_seed(1)
    trained = build_q_network(spec).eval()
    policy.load({k: v.numpy() for k, v in trained.state_dict().items()}, obs)
    with torch.inference_mode():
        expected = trained(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(policy.q_values(obs), expected, rtol=1e-5, atol=1e-5)


def test_collectors_and_the_trial_never_import_torch():
    """torch is the learner's alone for vector observations: a collector, evaluator or
    replay process, and the trial that drives them, start without its 2.6 CPU-seconds."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rayline.rl import apex, collector, learner_actor, pipeline, replay\n"
        "from rayline.rl.acting import acting_policy\n"
        "from rayline.rl.config import NetworkSpec\n"
        "import numpy as np\n"
        "acting_policy(NetworkSpec([4], 2, [8], True)).greedy(np.zeros((1, 4)))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nature_cnn_shapes():
    net = build_q_network(NetworkSpec([4, 84, 84], 6, [512], dueling=True))
    frames = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    assert net(frames).shape == (2, 6)


def scenes(rng: np.random.Generator, count: int) -> torch.Tensor:
    """Frame stacks like an Atari screen's: flat background, a few bright blocks."""
    frames = np.full((count, 4, 84, 84), 87, np.uint8)
    for frame in frames:
        for _ in range(6):
            row, col = rng.integers(0, 76, 2)
            height, width = rng.integers(2, 9, 2)
            frame[:, row : row + height, col : col + width] = rng.integers(100, 256)
    return torch.from_numpy(frames)


@pytest.mark.blas
def test_int8_acting_network_gives_the_float_q_values_and_follows_new_weights():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    spec = NetworkSpec([4, 84, 84], 6, [512], dueling=True)
    network = build_q_network(spec).eval()
    int8 = Int8ActingNetwork(network)
    with pytest.raises(RuntimeError, match="quantize"):
        int8(scenes(rng, 1))
    int8.quantize(scenes(rng, 8))  # calibrated on other frames than it is tested on
    frames = scenes(rng, 64)
    with torch.inference_mode():
        expected = network(frames)
    error = (int8(frames) - expected).abs().max()
    assert error <= 0.03 * expected.abs().max()

    trained = build_q_network(spec).eval()  # new weights: quantized again on load
    network.load_state_dict(trained.state_dict())
    int8.quantize(scenes(rng, 8))
    with torch.inference_mode():
        expected = trained(frames)
    got = int8(frames)
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    # The greedy action is the float one wherever the float margin exceeds the error.
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - expected).abs().max()
    assert clear.sum() >= 16
    assert torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_int8_inference_is_refused_for_vector_observations():
    from rayline.config import ConfigError
    from rayline.pipelines import load_pipeline

    pipeline, cfg = load_pipeline("pipelines/dqn-cartpole.yaml", {"collectors.inference": "int8"})
    with pytest.raises(ConfigError, match="collectors.inference: int8 is for image"):
        pipeline.prepare(cfg)
