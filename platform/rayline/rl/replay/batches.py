"""What moves between collectors, replay shards and the learner: plain NamedTuples of
numpy arrays (no per-transition Python objects)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Transitions(NamedTuple):
    """A batch of n-step transitions; see rayline.rl.dqn for what `discounts` holds."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray


class FrameTransitions(NamedTuple):
    """Transitions of stacked-frame observations sent without copies: `frames` holds each
    distinct frame of the batch once, and `obs`/`next_obs` are (B, stack) int32 indices
    into it. A batch is self-contained: it carries every frame it refers to."""

    frames: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray


class SampledBatch(NamedTuple):
    """Transitions drawn from the replay with their slots and importance weights."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray
    weights: np.ndarray
    indices: np.ndarray


class ShardSample(NamedTuple):
    """One shard's answer to `sample_at`: the transitions at the points it was sent,
    their slots and p^alpha, and the shard's mass and size after the draw (the learner
    uses them to split its next draw)."""

    transitions: Transitions
    slots: np.ndarray
    priorities: np.ndarray
    mass: float
    size: int
