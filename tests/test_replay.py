"""The replay buffer: storage, samplers, snapshots and invariants."""

import numpy as np
import pytest
import ray

from rayline.rl.replay import (
    FrameTransitions,
    ReplayActor,
    ReplayBuffer,
    ShardedReplay,
    Transitions,
)
from rayline.rl.replay.sum_tree import SumTree


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


@pytest.mark.blas
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


@pytest.mark.blas
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
    with pytest.raises(ValueError, match="the file holds observations"):
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
    sharded = ShardedReplay([replay], 100)
    batch = sharded.collect(sharded.request(3, 8), beta=0.4)
    assert batch.obs.shape == (3, 8, 2) and batch.indices.shape == (3, 8)
    assert np.all(batch.obs[..., 0] == batch.rewards)  # rows stay together
    ray.get(sharded.update_priorities(batch.indices, np.ones((3, 8))))
    assert ray.get(replay.size.remote()) == 40
    ray.kill(replay)


def frame_batch(first: int, count: int, stack: int = 4) -> FrameTransitions:
    """`count` transitions of one stream whose frames hold their own number: transition t
    sees frames first+t .. first+t+stack-1 and its next observation is one frame on."""
    frames = np.arange(first, first + count + stack, dtype=np.uint16).reshape(-1, 1, 1)
    positions = np.arange(count)[:, None] + np.arange(stack)[None, :]
    return FrameTransitions(
        frames=frames,
        obs=positions.astype(np.int32),
        actions=np.arange(count) % 3,
        rewards=(first + np.arange(count)).astype(np.float32),
        next_obs=(positions + 1).astype(np.int32),
        discounts=np.full(count, 0.9, np.float32),
    )


def assert_frames_consistent(batch) -> None:
    """Each sampled stack is 4 consecutive frame numbers starting at its reward, and
    next_obs is the same stack one frame on."""
    first = batch.rewards.astype(np.int64)
    expected = first[:, None] + np.arange(4)[None, :]
    assert np.array_equal(batch.obs.reshape(-1, 4), expected)
    assert np.array_equal(batch.next_obs.reshape(-1, 4), expected + 1)


@pytest.mark.parametrize("prioritized", [False, True])
def test_frame_storage_rebuilds_every_stack_and_drops_batches_whose_frames_are_gone(prioritized):
    buffer = ReplayBuffer(10, (4, 1, 1), np.uint16, prioritized=prioritized, frames=True)
    assert buffer.storage.frame_capacity == 12
    buffer.add(frame_batch(0, 3))  # 7 frames
    buffer.add(frame_batch(100, 3))  # 14 frames: the first batch's are overwritten
    assert len(buffer) == 3 and buffer.storage.oldest == 3
    buffer.check_valid()
    assert_frames_consistent(buffer.sample(32))
    assert set(buffer.sample(64).rewards.tolist()) == {100, 101, 102}
    for start in range(200, 1000, 100):  # round both rings many times
        buffer.add(frame_batch(start, 2))
        buffer.check_valid()
        assert_frames_consistent(buffer.sample(16))
    assert 0 < len(buffer) <= 10


def test_frame_storage_costs_about_one_frame_per_transition():
    buffer = ReplayBuffer(1000, (4, 84, 84), np.uint8, prioritized=True, frames=True)
    for start in range(0, 1000, 68):
        batch = frame_batch(start, 64)
        frames = np.repeat(batch.frames.astype(np.uint8), 84 * 84).reshape(-1, 84, 84)
        buffer.add(batch._replace(frames=frames))
    memory = buffer.memory()
    assert memory["frames_per_transition"] == pytest.approx(68 / 64)
    assert memory["bytes_per_transition"] <= 1.2 * 84 * 84
    sample = buffer.sample(8)
    assert sample.obs.shape == (8, 4, 84, 84) and sample.obs.dtype == np.uint8
    assert np.array_equal(sample.next_obs[:, :3], sample.obs[:, 1:])


def test_frame_snapshot_round_trip(tmp_path):
    buffer = ReplayBuffer(10, (4, 1, 1), np.uint16, prioritized=True, frames=True)
    for start in (0, 100, 200):
        buffer.add(frame_batch(start, 3))
    buffer.update_priorities(np.arange(10), np.arange(1, 11, dtype=np.float64))
    path = str(tmp_path / "replay.parquet")
    buffer.save(path)
    restored = ReplayBuffer(10, (4, 1, 1), np.uint16, prioritized=True, frames=True)
    restored.restore(path)
    restored.check_valid()
    for name, value in buffer.storage.state_dict().items():
        assert np.array_equal(restored.storage.state_dict()[name], value), name
    assert np.allclose(restored.sampler.tree.nodes, buffer.sampler.tree.nodes)
    assert_frames_consistent(restored.sample(16))
    with pytest.raises(ValueError, match="FrameStorage"):
        ReplayBuffer(10, (4, 1, 1), np.uint16, prioritized=True).restore(path)


@pytest.mark.blas
@pytest.mark.parametrize("prioritized", [False, True])
def test_two_shards_sample_exactly_as_one_buffer_holding_both(ray_session, prioritized):
    """The same random numbers draw the same transitions with the same importance weights
    from shards [A, B] as from one buffer holding A then B."""
    kwargs = dict(obs_shape=(2,), prioritized=prioritized, alpha=1.0, priority_eps=0.0)
    single = ReplayBuffer(20, seed=0, **kwargs)
    shards = [ReplayActor.remote(capacity=10, **kwargs) for _ in range(2)]
    priorities = np.arange(1, 21, dtype=np.float64) % 7 + 1  # integers: exact sums
    for index, shard in enumerate(shards):
        part = transitions(10 * index, 10)
        single.add(part)
        ray.get(shard.add.remote(part))
        ray.get(shard.update_priorities.remote(np.arange(10), priorities[10 * index :][:10]))
    single.update_priorities(np.arange(20), priorities)
    sharded = ShardedReplay(shards, 10, seed=7)
    single.rng = np.random.default_rng(7)
    for _ in range(5):
        drawn = sharded.collect(sharded.request(1, 16), beta=0.5)
        expected = single.sample(16, beta=0.5)
        assert np.array_equal(drawn.rewards[0], expected.rewards)
        assert np.array_equal(drawn.obs[0], expected.obs)
        assert np.allclose(drawn.weights[0], expected.weights, rtol=1e-6)
        assert np.array_equal(drawn.indices[0], expected.indices)  # shard * 10 + slot
    # priorities go back to the shard that holds the transition
    ray.get(sharded.update_priorities(np.array([[3, 15]]), np.array([[50.0, 60.0]])))
    masses = [ray.get(shard.mass.remote())[0] for shard in shards]
    if prioritized:
        assert masses[0] == priorities[:10].sum() - priorities[3] + 50
        assert masses[1] == priorities[10:].sum() - priorities[15] + 60
    else:
        assert masses == [10.0, 10.0]
    for shard in shards:
        ray.kill(shard)
