"""Q-networks: an MLP for vector observations, the Nature-DQN CNN for image stacks.

Both optionally end in a dueling head (Wang et al. 2016, https://arxiv.org/abs/1511.06581):
Q(s, a) = V(s) + A(s, a) - mean_a A(s, a).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class NetworkSpec:
    """Everything needed to rebuild a Q-network; saved beside its weights."""

    obs_shape: list[int]
    n_actions: int
    hidden_sizes: list[int]
    dueling: bool


class QHead(nn.Module):
    """Features -> Q-values, plain or dueling."""

    def __init__(self, in_features: int, n_actions: int, hidden: int, dueling: bool):
        super().__init__()
        self.dueling = dueling
        self.advantage = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_actions)
        )
        self.value = (
            nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            if dueling
            else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        advantage = self.advantage(features)
        if self.value is None:
            return advantage
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


class MLPQNetwork(nn.Module):
    """Flat observations -> ReLU MLP -> Q-head."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        in_features = 1
        for dim in spec.obs_shape:
            in_features *= dim
        *body_sizes, head_size = spec.hidden_sizes
        layers: list[nn.Module] = [nn.Flatten()]
        for size in body_sizes:
            layers += [nn.Linear(in_features, size), nn.ReLU()]
            in_features = size
        self.body = nn.Sequential(*layers)
        self.head = QHead(in_features, spec.n_actions, head_size, spec.dueling)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs.float()))


class NatureCNNQNetwork(nn.Module):
    """Stacked uint8 frames (C, 84, 84) -> Mnih et al. 2015's conv torso -> Q-head."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        channels = spec.obs_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            in_features = self.body(torch.zeros(1, *spec.obs_shape)).shape[1]
        self.head = QHead(in_features, spec.n_actions, spec.hidden_sizes[-1], spec.dueling)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs.float() / 255.0))


def build_q_network(spec: NetworkSpec) -> nn.Module:
    """The MLP for 1-D observations, the Nature CNN for (C, H, W) image stacks."""
    if not spec.hidden_sizes:
        raise ValueError("network.hidden_sizes: expected at least one layer size")
    if len(spec.obs_shape) == 3:
        return NatureCNNQNetwork(spec)
    return MLPQNetwork(spec)
