"""How a draw picks transitions: uniformly, or in proportion to p^alpha on a sum tree
(Schaul et al. 2016), and the importance weights that correct for it."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from rayline.rl.replay.sum_tree import SumTree

SAMPLER_BYTES = 16
"""Sum-tree bytes per slot (a leaf and, on average, an inner node of float64)."""


class Sampler(Protocol):
    """What the buffer asks of a sampler: told of slots added and dropped, it maps points
    in [0, mass) to slots and their p^alpha, and takes TD errors as new priorities."""

    def added(self, slots: np.ndarray) -> None: ...

    def dropped(self, slots: np.ndarray) -> None: ...

    def mass(self, size: int) -> float: ...

    def find(self, points: np.ndarray, size: int, oldest: int) -> tuple[np.ndarray, np.ndarray]: ...

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None: ...

    def check_valid(self, held: np.ndarray) -> None: ...

    def state_dict(self, slots: int) -> dict: ...

    def load_state_dict(self, state: dict, slots: int) -> None: ...


class UniformSampler:
    """Every held transition equally likely: a point v in [0, size) is the transition
    floor(v) places after the oldest."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def added(self, slots: np.ndarray) -> None:
        pass

    def dropped(self, slots: np.ndarray) -> None:
        pass

    def mass(self, size: int) -> float:
        return float(size)

    def find(self, points: np.ndarray, size: int, oldest: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.clip(np.floor(points).astype(np.int64), 0, size - 1)
        return (oldest + offsets) % self.capacity, np.ones(len(points))

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        pass

    def check_valid(self, held: np.ndarray) -> None:
        pass

    def state_dict(self, slots: int) -> dict:
        return {}

    def load_state_dict(self, state: dict, slots: int) -> None:
        pass


class PrioritisedSampler:
    """Proportional prioritisation on a sum tree: P(i) = p_i^alpha / sum p^alpha, new
    transitions at the highest priority seen, dropped ones at zero."""

    def __init__(self, capacity: int, alpha: float, priority_eps: float):
        self.capacity = capacity
        self.alpha, self.priority_eps = alpha, priority_eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0

    def added(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.full(len(slots), self.max_priority**self.alpha))

    def dropped(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.zeros(len(slots)))

    def mass(self, size: int) -> float:
        return self.tree.total

    def find(self, points: np.ndarray, size: int, oldest: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.tree.total
        slots = self.tree.find(np.clip(points, 0.0, total * (1 - 1e-12)))
        priorities = self.tree.get(slots)
        lost = priorities <= 0  # a point on the very edge of the mass, by rounding
        if lost.any():
            newest = (oldest + size - 1) % self.capacity
            slots[lost], priorities[lost] = newest, self.tree.get(np.array([newest]))[0]
        return slots, priorities

    def update(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        priorities = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.priority_eps
        if not np.all(np.isfinite(priorities)):
            raise ValueError("priority update with non-finite TD errors")
        indices = np.asarray(indices)
        held = self.tree.get(indices) > 0  # a transition dropped since it was drawn stays out
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.set(indices[held], priorities[held] ** self.alpha)

    def check_valid(self, held: np.ndarray) -> None:
        leaves = self.tree.nodes[self.tree.leaves :]
        is_held = np.zeros(len(leaves), dtype=bool)
        is_held[held] = True
        assert np.all(leaves[is_held] > 0), "stored transition with zero priority"
        assert np.all(leaves[~is_held] == 0), "empty slot with non-zero priority"
        inner = np.arange(1, self.tree.leaves)
        sums = self.tree.nodes[2 * inner] + self.tree.nodes[2 * inner + 1]
        assert np.allclose(self.tree.nodes[inner], sums, rtol=1e-9, atol=1e-9), (
            "sum tree inconsistent"
        )

    def state_dict(self, slots: int) -> dict:
        return {
            "max_priority": self.max_priority,
            "priorities": self.tree.get(np.arange(slots)) ** (1.0 / self.alpha),
        }

    def load_state_dict(self, state: dict, slots: int) -> None:
        self.max_priority = float(state.get("max_priority", 1.0))
        self.tree = SumTree(self.capacity)
        if slots:
            priorities = state.get("priorities", np.full(slots, self.max_priority))
            self.tree.set(np.arange(slots), np.asarray(priorities) ** self.alpha)


def stratified_points(rng: np.random.Generator, count: int, mass: float) -> np.ndarray:
    """One uniform point in each of `count` equal slices of [0, mass)."""
    return (np.arange(count) + rng.random(count)) * (mass / count)


def importance_weights(priorities: np.ndarray, mass: float, size: int, beta: float) -> np.ndarray:
    """(N P(i))^-beta with P(i) = p_i / mass, normalised by the batch maximum."""
    weights = (size * priorities / mass) ** (-beta)
    return (weights / weights.max()).astype(np.float32)
