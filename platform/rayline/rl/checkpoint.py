"""A DQN run's checkpoint: the learner's state, the kept evaluation's weights (what is
registered), counters, evaluation history, config and, with `replay.checkpoint`, the
replay shards. Written into a fresh directory that the reporter copies."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import ray

from rayline.config import to_dict
from rayline.fs import write_bytes
from rayline.rl.bookkeeping import Counters, Evaluations, RunState, Saved
from rayline.rl.config import DQNConfig, NetworkSpec
from rayline.rl.fleet import Fleet, shard_file

LEARNER_FILE = "learner.pt"
STATE_FILE = "state.json"
REPLAY_FILE = "replay.parquet"
EVALUATED_FILE = "evaluated_policy.pt"
"""The policy weights that the kept evaluation scored: what the run registers."""


def write_checkpoint(cfg: DQNConfig, spec: NetworkSpec, fleet: Fleet, state: RunState) -> str:
    """A new directory with the learner, the kept evaluation's weights, the counters,
    the evaluation history and the config (and the replay, with `replay.checkpoint`)."""
    directory = tempfile.mkdtemp(prefix="rayline-dqn-ckpt-")
    write_bytes(os.path.join(directory, LEARNER_FILE), ray.get(fleet.learner.state_bytes.remote()))
    if cfg.replay.checkpoint:
        shards = len(fleet.replays)
        ray.get(
            [
                replay.save.remote(os.path.join(directory, shard_file(REPLAY_FILE, i, shards)))
                for i, replay in enumerate(fleet.replays)
            ]
        )
    evaluations = state.evaluations
    if evaluations.kept_weights is not None:
        policy = ray.get(fleet.learner.policy_bytes.remote(evaluations.kept_weights))
        write_bytes(os.path.join(directory, EVALUATED_FILE), policy)
    body = {
        "counters": dataclasses.asdict(state.counters),
        "eval_history": evaluations.history,
        "kept_evaluation": evaluations.kept,
        "config": to_dict(cfg),
        "network": dataclasses.asdict(spec),
    }
    write_bytes(os.path.join(directory, STATE_FILE), json.dumps(body, indent=2).encode())
    return directory


def restore(cfg: DQNConfig, restore_dir: str, fleet: Fleet) -> Saved:
    """The learner and replay shards loaded from a checkpoint directory; its counters and
    evaluations (with the kept weights), for `RunState.restored`."""
    saved = json.loads(Path(restore_dir, STATE_FILE).read_text())
    evaluations = Evaluations(
        cfg.run.register,
        cfg.eval.solved_return,
        saved["eval_history"],
        confirm_z=cfg.eval.confirm_z,
    )
    if saved.get("kept_evaluation") and Path(restore_dir, EVALUATED_FILE).exists():
        evaluated = Path(restore_dir, EVALUATED_FILE).read_bytes()
        kept = ray.get(fleet.learner.policy_weights.remote(evaluated))
        evaluations.restore_kept(saved["kept_evaluation"], kept)
    ray.get(fleet.learner.load_state_bytes.remote(Path(restore_dir, LEARNER_FILE).read_bytes()))
    shards, restored = len(fleet.replays), {}
    for shard, replay in enumerate(fleet.replays):
        path = os.path.join(restore_dir, shard_file(REPLAY_FILE, shard, shards))
        if os.path.exists(path):
            restored[shard] = ray.get(replay.restore.remote(path))
    return Saved(Counters(**saved["counters"]), evaluations, restored)


def read_policy(checkpoint_dir: str) -> tuple[bytes, dict]:
    """The evaluated policy's state_dict bytes (the kept evaluation's weights) and the
    checkpoint's state.json, for registering."""
    path = Path(checkpoint_dir, EVALUATED_FILE)
    if not path.exists():
        raise RuntimeError(f"{checkpoint_dir}: no evaluated policy in the checkpoint")
    return path.read_bytes(), json.loads(Path(checkpoint_dir, STATE_FILE).read_text())
