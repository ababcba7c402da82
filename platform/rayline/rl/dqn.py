"""DQN's math as plain functions, apart from any Ray plumbing.

Mnih et al. 2015, "Human-level control through deep reinforcement learning"
(https://www.nature.com/articles/nature14236); van Hasselt et al. 2016, "Deep
Reinforcement Learning with Double Q-learning" (https://arxiv.org/abs/1509.06461);
The collectors' exploration schedules are in rayline.rl.exploration (no torch there:
the collectors' processes never import it).

A transition carries its own `discount`: gamma**k for an n-step transition that
bootstraps after k steps, 0 when the episode terminated inside it. So one formula,
    target = reward + discount * Q_target(next_obs, a*),
covers n-step returns, early episode ends, and termination vs time-limit truncation
(a truncated episode still bootstraps from its final observation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def bellman_target(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """r + discount * Q_target(s', a*), where a* = argmax_a Q_online(s', a) (Double DQN)
    when `next_q_online` is given, else argmax_a Q_target(s', a) (the Nature DQN target)."""
    chooser = next_q_target if next_q_online is None else next_q_online
    best_actions = chooser.argmax(dim=1, keepdim=True)
    next_value = next_q_target.gather(1, best_actions).squeeze(1)
    return rewards + discounts * next_value


def categorical_projection(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_probs: torch.Tensor,
    support: torch.Tensor,
) -> torch.Tensor:
    """C51's target (Bellemare et al. 2017, Algorithm 1): the distribution of
    r + discount * Z(s', a*) put back on `support`. Each next atom z_j moves to
    r + discount * z_j, clipped to [v_min, v_max], and its probability is split between
    the two support atoms around it in proportion to closeness (all of it to one atom it
    lands on exactly). A terminal transition (discount 0) puts all mass where r falls.
    `next_probs` [batch, atoms] is Z(s', a*); returns [batch, atoms], rows summing to 1."""
    atoms = support.numel()
    v_min, v_max = float(support[0]), float(support[-1])
    spacing = (v_max - v_min) / (atoms - 1)
    moved = (rewards.unsqueeze(1) + discounts.unsqueeze(1) * support.unsqueeze(0)).clamp(
        v_min, v_max
    )
    position = ((moved - v_min) / spacing).clamp(0, atoms - 1)
    lower, upper = position.floor().long(), position.ceil().long()
    lower_share = (upper.float() - position) + (lower == upper).float()
    upper_share = position - lower.float()
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower, next_probs * lower_share)
    projected.scatter_add_(1, upper, next_probs * upper_share)
    return projected


def cross_entropy_loss(
    target_probs: torch.Tensor, log_probs: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of predicted `log_probs` against `target_probs` (both
    [batch, atoms]), optionally importance-weighted per sample; and the per-sample values
    (C51's priorities)."""
    per_sample = -(target_probs * log_probs).sum(dim=1)
    weighted = per_sample * weights if weights is not None else per_sample
    return weighted.mean(), per_sample


def huber_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    delta: float = 1.0,
) -> torch.Tensor:
    """Mean Huber (smooth L1) loss, optionally importance-weighted per sample."""
    per_sample = F.huber_loss(predicted, target, reduction="none", delta=delta)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def n_step_transitions(
    rewards: np.ndarray, terminated: bool, gamma: float, n: int
) -> list[tuple[int, float, int, float]]:
    """Every n-step transition of one finished episode, as
    (start step, discounted return, bootstrap step, discount).

    `rewards[t]` is the reward of the step out of state t; the episode has len(rewards)
    steps and its final observation is state len(rewards). A transition from step t sums
    up to n rewards and bootstraps from state min(t + n, T) with discount gamma**k, or 0
    if the episode terminated at T (a time-limit truncation bootstraps).
    """
    steps = len(rewards)
    out = []
    for start in range(steps):
        end = min(start + n, steps)
        k = end - start
        ret = float(sum(gamma**i * rewards[start + i] for i in range(k)))
        discount = 0.0 if (terminated and end == steps) else gamma**k
        out.append((start, ret, end, discount))
    return out


def is_target_sync_due(learner_updates: int, every_updates: int) -> bool:
    """True after every `every_updates`-th learner update (counted in updates, never env
    steps: mixing the two units is a recurring DQN bug, ray-project/ray#48802)."""
    return every_updates > 0 and learner_updates > 0 and learner_updates % every_updates == 0


@torch.no_grad()
def hard_update(target: nn.Module, online: nn.Module) -> None:
    """Copy the online network's parameters into the target network."""
    target.load_state_dict(online.state_dict())


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)
