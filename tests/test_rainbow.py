"""Rainbow's distributional (C51) and noisy-net parts, and the torso chosen by the
observation: known answers, not shapes."""

import numpy as np
import pytest
import torch

from rayline.rl import dqn
from rayline.rl.acting import acting_policy
from rayline.rl.collector import Collector
from rayline.rl.config import LearnerConfig, NetworkSpec, choose_torso
from rayline.rl.envs import EnvSpec
from rayline.rl.learner import Learner
from rayline.rl.networks import NoisyLinear, build_q_network, reset_noise
from rayline.rl.replay import ReplayBuffer
from rayline.testing import CHAIN_ENV_ID, chain_q_star

SUPPORT = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])


def project(reward: float, discount: float, next_probs: list[float]) -> np.ndarray:
    out = dqn.categorical_projection(
        *(torch.tensor([v], dtype=torch.float32) for v in (reward, discount, next_probs)), SUPPORT
    )
    return out[0].numpy()


@pytest.mark.parametrize(
    "reward, discount, next_probs, expected, case",
    [
        (0.5, 1.0, [0, 1, 0, 0, 0], [0, 0.5, 0.5, 0, 0], "1 + 0.5 falls halfway between atoms"),
        (0.2, 0.9, [0, 0, 0, 1, 0], [0, 0, 0.1, 0.9, 0], "0.2 + 0.9 * 3 = 2.9"),
        (1.0, 1.0, [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], "lands exactly on atom 3"),
        (2.25, 0.0, [0.2] * 5, [0, 0, 0.75, 0.25, 0], "terminal: all mass where r falls"),
        (3.0, 0.5, [0, 0, 0, 0.5, 0.5], [0, 0, 0, 0, 1], "4.5 and 5 clip to v_max"),
        (-3.0, 1.0, [0, 0, 0.3, 0, 0.7], [0.3, 0.7, 0, 0, 0], "-1 clips to v_min, 1 stays"),
        (
            0.5,
            0.5,
            [0.1, 0.2, 0.3, 0.4, 0.0],
            # atoms move to 0.5, 1.0, 1.5, 2.0, 2.5
            [0.05, 0.05 + 0.2 + 0.15, 0.15 + 0.4, 0, 0],
            "a spread distribution, halved and shifted",
        ),
    ],
)
def test_categorical_projection_matches_hand_computed_cases(
    reward, discount, next_probs, expected, case
):
    projected = project(reward, discount, next_probs)
    np.testing.assert_allclose(projected, expected, atol=1e-6, err_msg=case)
    assert projected.sum() == pytest.approx(1.0)


def test_projection_keeps_the_mean_of_a_target_inside_the_support():
    """Between v_min and v_max, the projection moves no mass's mean: E[target] is
    r + discount * E[Z(s')] (what makes C51's expectation converge to Q*)."""
    generator = torch.Generator().manual_seed(0)
    support = torch.linspace(-5, 5, 21)
    probs = torch.rand(64, 21, generator=generator)
    probs[:, :6] = 0  # next returns in [-2.5, 5]: r + 0.5 * z stays inside
    probs[:, -6:] = 0
    probs /= probs.sum(1, keepdim=True)
    rewards = torch.rand(64, generator=generator) * 2 - 1
    discounts = torch.full((64,), 0.5)
    projected = dqn.categorical_projection(rewards, discounts, probs, support)
    expected_mean = rewards + 0.5 * (probs * support).sum(1)
    torch.testing.assert_close((projected * support).sum(1), expected_mean)


def test_noisy_layer_noise_has_the_factorised_statistics_and_eval_is_the_mean():
    torch.manual_seed(0)
    layer = NoisyLinear(400, 300, sigma0=0.5)
    assert torch.allclose(layer.weight_sigma, torch.full((300, 400), 0.5 / 20))
    draws_in, draws_out = [], []
    for _ in range(200):
        layer.reset_noise()
        draws_in.append(layer.eps_in.clone())
        draws_out.append(layer.eps_out.clone())
    eps = torch.cat(draws_in + draws_out)
    # f(x) = sign(x) sqrt(|x|), x ~ N(0, 1): mean 0, E[f^2] = E|x| = sqrt(2 / pi).
    assert abs(float(eps.mean())) < 0.01
    assert float((eps**2).mean()) == pytest.approx(np.sqrt(2 / np.pi), rel=0.01)
    # The weight's noise is the outer product of the two vectors: rank 1.
    x = torch.randn(8, 400)
    noisy_out = layer(x)
    noise = (noisy_out - torch.nn.functional.linear(x, layer.weight, layer.bias)).detach()
    expected = (x * layer.eps_in) @ (layer.weight_sigma * layer.eps_out[:, None]).T + (
        layer.bias_sigma * layer.eps_out
    )
    torch.testing.assert_close(noise, expected.detach(), rtol=1e-4, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_noisy_layer_sigma_learns_to_shrink_where_noise_only_hurts():
    """Fitting a deterministic linear map, the noise only adds error: gradient descent
    drives sigma down (the paper's point: the network learns how much to explore)."""
    torch.manual_seed(0)
    layer = NoisyLinear(8, 4, sigma0=0.5)
    true_weight = torch.randn(4, 8)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    start = float(layer.weight_sigma.detach().abs().mean())
    for _ in range(600):
        layer.reset_noise()
        x = torch.randn(64, 8)
        loss = ((layer(x) - x @ true_weight.T) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(layer.weight_sigma.detach().abs().mean()) < 0.3 * start
    torch.testing.assert_close(layer.weight.detach(), true_weight, atol=0.05, rtol=0)


def test_a_collectors_noisy_copy_acts_on_fresh_noise_and_an_evaluators_on_the_means():
    spec = NetworkSpec([6], 4, [32], dueling=True, noisy=True)
    obs = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)
    exploring = acting_policy(spec, seed=1, exploring=True)
    evaluating = acting_policy(spec, seed=1)
    weights = {k: v.numpy() for k, v in build_q_network(spec).state_dict().items()}
    exploring.load(weights, obs)
    evaluating.load(weights, obs)
    evaluations = [evaluating.greedy(obs) for _ in range(3)]
    assert all((e == evaluations[0]).all() for e in evaluations)
    explorations = [exploring.greedy(obs) for _ in range(5)]
    assert any((e != explorations[0]).any() for e in explorations[1:])


def chain_learner(spec: NetworkSpec, gamma: float, **settings) -> tuple[Learner, ReplayBuffer]:
    collector = Collector(
        EnvSpec(CHAIN_ENV_ID), spec, num_envs=4, epsilons=[1.0] * 4, n_step=1, gamma=gamma
    )
    batch, _ = collector.collect(2000)
    replay = ReplayBuffer(5000, tuple(spec.obs_shape), np.float32, prioritized=True, seed=0)
    replay.add(batch)
    learner = Learner(
        spec,
        LearnerConfig(gamma=gamma, target_sync_every_updates=50, device="cpu", **settings),
        seed=0,
    )
    return learner, replay


@pytest.mark.parametrize(
    "noisy, dueling, double_q",
    [(False, False, True), (True, True, True), (False, True, False)],
    ids=["c51", "c51-noisy-dueling", "c51-dueling-nature-target"],
)
def test_c51_expectation_converges_to_closed_form_q_star(noisy, dueling, double_q):
    """On a chain with closed-form returns, under uniformly random behaviour, each
    action's distribution's expectation (what every greedy choice uses) reaches Q*."""
    length, gamma = 5, 0.9
    spec = NetworkSpec([length], 2, [32], dueling, num_atoms=51, v_min=-0.5, v_max=1.5, noisy=noisy)
    learner, replay = chain_learner(spec, gamma, lr=5e-3, double_q=double_q)
    for _ in range(1200):
        sample = replay.sample(64, beta=0.4)
        _, priorities = learner.update(sample)
        assert (priorities >= 0).all()  # cross-entropies
        replay.update_priorities(sample.indices, priorities)
    states = torch.eye(length)[: length - 1]
    learner.policy.eval()  # noisy layers: their means
    with torch.no_grad():
        q = learner.policy(states).numpy()
        probs = learner.policy.logits(states).softmax(2)
    assert torch.allclose(probs.sum(2), torch.ones(length - 1, 2))
    assert np.abs(q - chain_q_star(length, gamma)).max() < 0.05, q
    # The return is deterministic: each distribution ends concentrated near its value.
    support = learner.policy.head.support
    spread = (probs * (support - torch.from_numpy(q)[..., None]) ** 2).sum(2).sqrt()
    assert float(spread.max()) < 0.15


def test_noisy_learner_draws_fresh_noise_every_update():
    spec = NetworkSpec([5], 2, [16], False, noisy=True)
    learner, replay = chain_learner(spec, 0.9, lr=1e-3)
    layer = learner.policy.head.advantage[0]
    seen = []
    for _ in range(3):
        learner.update(replay.sample(32, beta=0.4))
        seen.append(layer.eps_in.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize(
    "shape, torso",
    [
        ((4,), "mlp"),
        ((4, 84, 84), "nature_cnn"),
        ((84, 84, 3), "nature_cnn"),
        ((10, 10, 4), "small_cnn"),
        ((4, 10, 10), "small_cnn"),
        ((6, 40, 30), "small_cnn"),
    ],
)
def test_auto_torso_follows_the_observation(shape, torso):
    assert choose_torso("auto", shape) == torso
    network = build_q_network(NetworkSpec(list(shape), 3, [16], True, torso=torso))
    assert network(torch.zeros(2, *shape, dtype=torch.uint8)).shape == (2, 3)


@pytest.mark.parametrize(
    "requested, shape, words",
    [
        ("auto", (10, 10), "shape [10, 10]"),
        ("auto", (2, 3, 4, 5), "shape [2, 3, 4, 5]"),
        ("nature_cnn", (10, 10, 4), "at least 36 x 36"),
        ("small_cnn", (4,), "needs image observations"),
        ("small_cnn", (2, 2, 1), "at least 3 x 3"),
    ],
)
def test_a_layout_no_torso_fits_is_refused_naming_the_shape(requested, shape, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        choose_torso(requested, shape)
    assert choose_torso("mlp", shape) == "mlp"  # flattening fits anything


def test_small_cnn_is_minatars_reference_network_and_reads_bool_grids_channels_last():
    spec = NetworkSpec([10, 10, 4], 3, [128], False, torso="small_cnn", obs_dtype="bool")
    network = build_q_network(spec)
    conv, linear = network.body[0], network.head.advantage[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 16, (3, 3))
    assert (linear.in_features, linear.out_features) == (16 * 8 * 8, 128)
    grid = np.zeros((1, 10, 10, 4), bool)
    grid[0, 2, 5, 1] = True  # one object in channel 1 at row 2, column 5
    with torch.no_grad():
        from_bools = network(torch.from_numpy(grid))
        channels_first = torch.from_numpy(grid).permute(0, 3, 1, 2).float()
        by_hand = network.head(network.body(channels_first))
    torch.testing.assert_close(from_bools, by_hand)


def test_noisy_c51_networks_keep_their_state_through_a_reload():
    spec = NetworkSpec([10, 10, 4], 3, [32], True, torso="small_cnn", num_atoms=11, noisy=True)
    first = build_q_network(spec)
    second = build_q_network(spec)
    second.load_state_dict(first.state_dict())
    first.eval(), second.eval()
    obs = torch.rand(4, 10, 10, 4) > 0.5
    torch.testing.assert_close(first(obs), second(obs))
    reset_noise(first)  # the means do not move with the noise
    torch.testing.assert_close(first(obs), second(obs))
