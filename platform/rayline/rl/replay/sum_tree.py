"""The sum tree under prioritised sampling."""

from __future__ import annotations

import numpy as np


class SumTree:
    """Binary tree over `capacity` leaves whose inner nodes hold the sums of their
    children: prefix-sum lookup and update in O(log n), vectorised over batches."""

    def __init__(self, capacity: int):
        self.leaves = 1 << max(0, (capacity - 1).bit_length())
        self.nodes = np.zeros(2 * self.leaves, dtype=np.float64)  # node 1 is the root

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.nodes[indices + self.leaves]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        if len(indices) == 0:
            return
        nodes = np.unique(np.asarray(indices) + self.leaves)
        self.nodes[np.asarray(indices) + self.leaves] = values
        while nodes[0] > 1:
            nodes = np.unique(nodes // 2)
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each value v, the leaf i with sum(leaves[:i]) <= v < sum(leaves[:i+1])."""
        nodes = np.ones(len(prefix_sums), dtype=np.int64)
        values = np.array(prefix_sums, dtype=np.float64)
        while nodes[0] < self.leaves:
            left = 2 * nodes
            left_sums = self.nodes[left]
            go_right = values >= left_sums
            values = np.where(go_right, values - left_sums, values)
            nodes = np.where(go_right, left + 1, left)
        return nodes - self.leaves
