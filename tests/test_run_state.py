"""A DQN run's state has one owner: what the fleet's rebuilds, a checkpoint and the calls
report reaches the counters and the console through `RunState` (rayline.rl.bookkeeping);
the placement group's layout and every seed come from one object each
(rayline.rl.layout). Plain Python: no Ray."""

import time

import pytest

from rayline.config import ConfigError, from_dict
from rayline.rl.bookkeeping import Counters, Evaluations, RunState, Saved
from rayline.rl.config import DQNConfig
from rayline.rl.layout import Bundles, Seeds
from rayline.rl.replay import Restored, Snapshot


def fresh_state(shards: int = 2) -> RunState:
    return RunState(
        Counters(),
        Evaluations("best", 475.0),
        time.monotonic(),
        shard_sizes=[0] * shards,
        shard_added=[0] * shards,
    )


def test_a_rebuilt_replay_shard_counts_what_its_snapshot_missed():
    state = fresh_state()
    state.shard_added = [900, 700]
    state.shard_sizes = [800, 700]
    state.counters.transitions_added = 1600
    state.replay_rebuilt(0, Restored(size=600, added=650), named=True)
    c = state.counters
    assert (c.replay_restarts, c.transitions_lost, c.transitions_added) == (1, 250, 1350)
    assert state.shard_added == [650, 700] and state.shard_sizes == [600, 700]
    assert state.console == [
        "replay shard 0 lost: rebuilt from its snapshot with 600 transitions (250 transitions lost)"
    ]
    # A snapshot that somehow holds more than was counted loses nothing.
    state.replay_rebuilt(1, Restored(size=700, added=720), named=False)
    assert state.counters.transitions_lost == 250
    assert state.console[-1].startswith("replay lost: rebuilt from its snapshot with 700")


def test_a_rebuilt_learner_goes_back_to_its_kept_updates():
    state = fresh_state()
    state.counters.learner_updates = 5_000
    state.learner_rebuilt(4_096)
    c = state.counters
    assert (c.learner_restarts, c.updates_lost, c.learner_updates) == (1, 904, 4_096)
    assert state.console == [
        "learner lost: rebuilt from its state at 4,096 updates (904 updates lost)"
    ]


def test_a_collector_restart_is_counted_when_another_process_answers():
    state = fresh_state()
    for index, incarnation in [(0, "a"), (1, "b"), (0, "a"), (0, "c"), (1, "b"), (0, "c")]:
        state.collector_answered(index, incarnation)
    assert state.counters.collector_restarts == 1


def test_snapshots_hung_actors_weight_syncs_and_confirmations_reach_the_state():
    state = fresh_state()
    state.snapshot_taken(Snapshot(taken=True, stall_s=0.25))
    state.snapshot_taken(Snapshot(taken=False, stall_s=0.0))
    state.weights_synced()
    state.hung_killed(["collector 1", "replay shard 0"], 4.0)
    assert state.counters.replay_snapshots == 1 and state.counters.weight_syncs == 1
    assert state.timers.seconds["replay_snapshot_stall"] == 0.25
    assert state.console == [
        "collector 1 did not answer a ping in 4 s: killed",
        "replay shard 0 did not answer a ping in 4 s: killed",
    ]
    record = state.evaluated(2_000, "weights", [480.0] * 10)
    state.confirmed(2_000, record, [400.0, 420.0], "weights")
    assert not state.evaluations.solved
    assert state.console[-1].startswith("evaluation at 2,000 env steps not confirmed: 480.0, then")
    state.confirmed(2_000, record, [500.0] * 20, "weights")
    assert state.evaluations.solved


def test_a_restored_checkpoint_replaces_counters_evaluations_and_shard_sizes():
    state = fresh_state()
    saved = Saved(
        Counters(env_steps_sampled=3_000, learner_updates=700),
        Evaluations("best", 475.0, [{"env_steps": 2_000, "return_mean": 30.0}]),
        {1: Restored(size=2_500, added=2_900)},
    )
    state.restored(saved)
    assert state.counters.env_steps_sampled == 3_000 and state.evaluations is saved.evaluations
    assert state.shard_sizes == [0, 2_500] and state.shard_added == [0, 2_900]


@pytest.mark.parametrize("replay_resources", [{}, {"replay_host": 1.0}])
def test_the_bundle_layout_read_is_the_one_built(replay_resources):
    cfg = from_dict(
        DQNConfig,
        {
            "pipeline": "dqn",
            "collectors": {"num_collectors": 3, "resources": {"collector_host": 1.0}},
            "learner": {"num_cpus": 2.0},
            "replay": {"resources": replay_resources},
        },
    )
    layout = Bundles.of(cfg)
    built = layout.bundles()
    # Tune drops an empty head bundle from the group it makes: the indices hold either way.
    group = built if built[0] else built[1:]
    assert group[layout.index(len(group), "learner")] == {"CPU": 2.0}
    for collector in range(3):
        bundle = group[layout.index(len(group), "collector", collector)]
        assert bundle == {"CPU": cfg.collectors.num_cpus, "collector_host": 1.0}
    assert (built[0] == {"replay_host": 1.0}) is bool(replay_resources)
    with pytest.raises(ValueError, match="collector 3"):
        layout.index(len(group), "collector", 3)


def test_every_seed_of_a_run_comes_from_its_run_seed():
    seeds = Seeds(7)
    evaluations = {seeds.evaluation(k) for k in range(100)}
    confirmations = {seeds.confirmation(k) + i for k in range(20) for i in range(100)}
    others = {seeds.final_evaluation(), seeds.registration()}
    assert not evaluations & confirmations and not (evaluations | confirmations) & others
    assert [seeds.collector(i) for i in range(3)] == [7000, 7001, 7002]
    assert seeds.learner() == 7 and Seeds(8).registration() == seeds.registration() + 1


def test_the_checkpoints_replay_setting_keeps_its_old_name_readable():
    """`replay.snapshot` (the replay in every checkpoint) is now `replay.checkpoint`:
    "snapshot" names only the background copies. A config or a resumed run from before
    still reads; both at once are refused, naming them."""
    old = from_dict(DQNConfig, {"pipeline": "dqn", "replay": {"snapshot": True}})
    assert old.replay.checkpoint is True
    with pytest.raises(ConfigError, match="replay.snapshot: renamed replay.checkpoint"):
        from_dict(DQNConfig, {"pipeline": "dqn", "replay": {"snapshot": True, "checkpoint": False}})
