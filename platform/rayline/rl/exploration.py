"""Exploration schedules for the collectors: Horgan et al. 2018, "Distributed Prioritized
Experience Replay" (https://arxiv.org/abs/1803.00933) for the epsilon ladder."""

from __future__ import annotations

import numpy as np


def epsilon_ladder(index: int, count: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Ape-X exploration rate of actor `index` of `count`: base ** (1 + alpha * i / (N - 1)).
    A lone actor gets `base`."""
    if not 0 <= index < count:
        raise ValueError(f"actor index {index} out of range for {count} actors")
    if count == 1:
        return base
    return base ** (1.0 + alpha * index / (count - 1))


def linear_schedule(
    step: int, start: float, end: float | np.ndarray, duration: int
) -> float | np.ndarray:
    """`start` at step 0, moving linearly to `end` at `duration`, then constant (`end`
    may be an array: one schedule per element)."""
    if duration <= 0 or step >= duration:
        return end
    return start + (end - start) * step / duration
