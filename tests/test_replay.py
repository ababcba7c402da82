"""The replay buffer: storage, samplers, snapshots and invariants."""

import numpy as np
import pytest
import ray

from rayline.rl.replay import ReplayActor, ReplayBuffer, SumTree, Transitions


def transitions(start, count, obs_dim=2):
    ids = np.arange(start, start + count)
    return Transitions(
        obs=np.repeat(ids[:, None], obs_dim, 1).astype(np.float32),
        actions=ids % 3,
        rewards=ids.astype(np.float32),
        next_obs=np.repeat(ids[:, None] + 1, obs_dim, 1).astype(np.float32),
        discounts=np.full(count, 0.99, np.float32),
    )


@pytest.mark.parametrize("prioritized", [False, True])
def test_ring_wraps_around_keeping_the_newest(prioritized):
    buffer = ReplayBuffer(10, (2,), prioritized=prioritized)
    buffer.add(transitions(0, 7))
    buffer.add(transitions(7, 6))  # 13 added: 0..2 overwritten by 10..12
    assert len(buffer) == 10 and buffer.added == 13
    assert sorted(buffer.storage.rewards.tolist()) == list(range(3, 13))
    assert buffer.storage.rewards[:3].tolist() == [10, 11, 12]
    assert np.all(buffer.storage.obs[:, 0] == buffer.storage.rewards) and np.all(
        buffer.storage.next_obs[:, 0] == buffer.storage.rewards + 1
    )
    buffer.check_valid()
    buffer.add(transitions(100, 25))  # more than capacity at once
    assert sorted(buffer.storage.rewards.tolist()) == list(range(115, 125))
    buffer.check_valid()


def test_uniform_sampling_covers_the_buffer_evenly():
    buffer = ReplayBuffer(50, (2,), prioritized=False, seed=1)
    buffer.add(transitions(0, 50))
    counts = np.zeros(50)
    for _ in range(400):
        batch = buffer.sample(50)
        assert np.all(batch.weights == 1.0)
        assert np.all(batch.obs[:, 0] == batch.rewards)  # rows stay together
        np.add.at(counts, batch.indices, 1)
    expected = 400
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_sum_tree_prefix_lookup():
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 0.0, 2.0, 3.0, 4.0]))
    assert tree.total == 10.0
    assert tree.find(np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99])).tolist() == [
        0,
        0,
        2,
        2,
        3,
        3,
        4,
        4,
    ]


def test_prioritized_frequencies_follow_priorities():
    buffer = ReplayBuffer(4, (2,), prioritized=True, alpha=1.0, priority_eps=0.0, seed=3)
    buffer.add(transitions(0, 4))
    buffer.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    counts = np.zeros(4)
    draws = 0
    for _ in range(2000):
        batch = buffer.sample(16, beta=0.5)
        np.add.at(counts, batch.indices, 1)
        draws += 16
    expected = np.array([0.1, 0.2, 0.3, 0.4]) * draws
    # stratified sampling is less variable than multinomial; a 4-sigma band is generous
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected))
    batch = buffer.sample(16, beta=1.0)
    # importance weights (N * P(i))^-1 normalised by the max: 1/p relative to the smallest p
    expected_w = (1.0 / (4 * np.array([0.1, 0.2, 0.3, 0.4])))[batch.indices]
    assert np.allclose(batch.weights, expected_w / expected_w.max(), rtol=1e-5)


def test_priority_updates_and_new_items_at_max_priority():
    buffer = ReplayBuffer(8, (2,), prioritized=True, alpha=0.5, priority_eps=0.0)
    buffer.add(transitions(0, 4))
    buffer.update_priorities(np.array([0, 1]), np.array([-9.0, 0.25]))  # |td|
    assert np.allclose(buffer.sampler.tree.get(np.array([0, 1])), [3.0, 0.5])
    assert buffer.sampler.max_priority == 9.0
    buffer.add(transitions(4, 1))
    assert buffer.sampler.tree.get(np.array([4]))[0] == pytest.approx(3.0)  # 9 ** 0.5
    with pytest.raises(ValueError, match="non-finite"):
        buffer.update_priorities(np.array([0]), np.array([np.nan]))
    buffer.check_valid()


def test_snapshot_round_trip_through_parquet(tmp_path):
    buffer = ReplayBuffer(6, (2, 3), obs_dtype=np.uint8, prioritized=True)
    batch = Transitions(
        obs=np.arange(8 * 6, dtype=np.uint8).reshape(8, 2, 3),
        actions=np.arange(8) % 4,
        rewards=np.linspace(-1, 1, 8).astype(np.float32),
        next_obs=np.full((8, 2, 3), 7, np.uint8),
        discounts=np.linspace(0, 1, 8).astype(np.float32),
    )
    buffer.add(batch)
    buffer.update_priorities(np.arange(6), np.arange(1, 7, dtype=np.float64))
    path = str(tmp_path / "replay.parquet")
    buffer.save(path)
    restored = ReplayBuffer(6, (2, 3), obs_dtype=np.uint8, prioritized=True)
    restored.restore(path)
    restored.check_valid()
    for name in ("obs", "actions", "rewards", "next_obs", "discounts"):
        assert np.array_equal(getattr(restored.storage, name), getattr(buffer.storage, name)), name
    assert restored.added == 8 and restored.sampler.max_priority == buffer.sampler.max_priority
    assert np.allclose(restored.sampler.tree.nodes, buffer.sampler.tree.nodes)
    with pytest.raises(ValueError, match="snapshot holds observations"):
        ReplayBuffer(6, (4,), prioritized=True).restore(path)
    assert [p.name for p in tmp_path.iterdir()] == ["replay.parquet"]  # no temp files left


def test_invariant_check_catches_corruption():
    buffer = ReplayBuffer(8, (2,), prioritized=True)
    buffer.add(transitions(0, 5))
    buffer.check_valid()
    buffer.sampler.tree.nodes[1] += 1.0
    with pytest.raises(AssertionError, match="sum tree"):
        buffer.check_valid()
    buffer = ReplayBuffer(8, (2,), prioritized=False)
    buffer.add(transitions(0, 5))
    buffer.storage.discounts[2] = 1.5
    with pytest.raises(AssertionError, match="discount"):
        buffer.check_valid()


def test_constructor_fails_fast_with_a_memory_estimate():
    with pytest.raises(MemoryError, match="GiB"):
        ReplayBuffer(10**9, (4, 84, 84), obs_dtype=np.uint8)


def test_replay_actor_add_sample_update(ray_session):
    replay = ReplayActor.remote(
        capacity=100, obs_shape=(2,), obs_dtype=np.float32, prioritized=True
    )
    assert ray.get(replay.add.remote(transitions(0, 40))) == 40
    batch = ray.get(replay.sample_many.remote(3, 8, 0.4))
    assert batch.obs.shape == (3, 8, 2) and batch.indices.shape == (3, 8)
    ray.get(replay.update_priorities.remote(batch.indices, np.ones((3, 8))))
    assert ray.get(replay.size.remote()) == 40
    ray.kill(replay)
