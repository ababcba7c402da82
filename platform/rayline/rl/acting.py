"""The policy copy that collectors and the evaluator act with.

For an MLP with a plain (or dueling) head it is the network's forward pass in numpy: a
collector or evaluator process then never imports torch, which costs 2.6 CPU-seconds and
700 MB per process (the CUDA build) and was most of a run's start-up on 2 cores, where
five processes imported it at once. Otherwise (a CNN torso, a C51 or noisy head) it is
the torch network (float32, or int8 for the Nature CNN when `collectors.inference:
int8`), imported only there. A collector's copy of a noisy network acts on fresh noise
at every step; an evaluator's acts on the mean weights.

Weights come as the learner broadcasts them: its policy's state_dict as numpy arrays.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from rayline.rl.config import NetworkSpec


class ActingPolicy(Protocol):
    def load(self, weights: dict[str, np.ndarray], observations: np.ndarray) -> None:
        """Act with `weights` from now on; `observations` are the frames at hand (the
        int8 copy calibrates its activation ranges on them)."""

    def greedy(self, observations: np.ndarray) -> np.ndarray:
        """The greedy action (int64) of each observation in the batch."""


class NumpyMLPPolicy:
    """rayline.rl.networks.MLPQNetwork's forward pass (plain or dueling head) in float32
    numpy, read from that network's state_dict keys."""

    def __init__(self, spec: NetworkSpec, seed: int = 0):
        self.spec = spec
        self.body: list[tuple[np.ndarray, np.ndarray]] = []
        self.advantage: list[tuple[np.ndarray, np.ndarray]] = []
        self.value: list[tuple[np.ndarray, np.ndarray]] = []
        # Until the first load: torch's default Linear initialisation, so a policy used
        # before any broadcast (tests, benchmarks) acts as a fresh network would.
        self.load(self._initial_weights(np.random.default_rng(seed)), np.empty(0))

    def _initial_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        weights = {}
        for name, fan_in, fan_out in self._layers():
            bound = 1.0 / np.sqrt(fan_in)
            weights[f"{name}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in))
            weights[f"{name}.bias"] = rng.uniform(-bound, bound, fan_out)
        return weights

    def _layers(self) -> list[tuple[str, int, int]]:
        """(state_dict prefix, in, out) of every Linear, as MLPQNetwork names them: the
        body is Sequential(Flatten, Linear, ReLU, Linear, ReLU, ...)."""
        in_features = int(np.prod(self.spec.obs_shape))
        *body_sizes, head_size = self.spec.hidden_sizes
        layers = []
        for i, size in enumerate(body_sizes):
            layers.append((f"body.{1 + 2 * i}", in_features, size))
            in_features = size
        heads = ["advantage", "value"] if self.spec.dueling else ["advantage"]
        for head in heads:
            outputs = self.spec.n_actions if head == "advantage" else 1
            layers.append((f"head.{head}.0", in_features, head_size))
            layers.append((f"head.{head}.2", head_size, outputs))
        return layers

    def load(self, weights: dict[str, np.ndarray], observations: np.ndarray) -> None:
        def layer(name: str) -> tuple[np.ndarray, np.ndarray]:
            # Transposed once here: x @ W.T on every step would copy W.
            weight = np.ascontiguousarray(np.asarray(weights[f"{name}.weight"], np.float32).T)
            return weight, np.asarray(weights[f"{name}.bias"], np.float32)

        names = [name for name, _, _ in self._layers()]
        self.body = [layer(n) for n in names if n.startswith("body.")]
        self.advantage = [layer(n) for n in names if n.startswith("head.advantage.")]
        self.value = [layer(n) for n in names if n.startswith("head.value.")]

    def q_values(self, observations: np.ndarray) -> np.ndarray:
        x = np.asarray(observations, np.float32).reshape(len(observations), -1)
        if self.spec.pixel_scale() != 1.0:
            x = x / np.float32(255.0)
        for weight, bias in self.body:
            x = np.maximum(x @ weight + bias, 0.0)
        advantage = _head(x, self.advantage)
        if not self.value:
            return advantage
        return _head(x, self.value) + advantage - advantage.mean(axis=1, keepdims=True)

    def greedy(self, observations: np.ndarray) -> np.ndarray:
        return self.q_values(observations).argmax(axis=1)


def _head(features: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    (hidden_weight, hidden_bias), (out_weight, out_bias) = layers
    return np.maximum(features @ hidden_weight + hidden_bias, 0.0) @ out_weight + out_bias


class TorchPolicy:
    """The torch Q-network, float32 or int8; `exploring` with a noisy network: fresh
    noise for every batch of actions."""

    def __init__(
        self,
        spec: NetworkSpec,
        inference: str,
        observations: np.ndarray | None,
        exploring: bool = False,
        seed: int = 0,
    ):
        import torch

        from rayline.rl.networks import (
            Int8ActingNetwork,
            build_q_network,
            greedy_actions,
            reset_noise,
        )

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.network = build_q_network(spec).train(exploring and spec.noisy)
        self.int8 = Int8ActingNetwork(self.network) if inference == "int8" else None
        greedy = greedy_actions(self.int8 or self.network)
        if self.network.training:

            def greedy_on_fresh_noise(observations: np.ndarray) -> np.ndarray:
                reset_noise(self.network)
                return greedy(observations)

            self.greedy = greedy_on_fresh_noise
        else:
            self.greedy = greedy
        if self.int8:
            self.int8.quantize(torch.as_tensor(observations))

    def load(self, weights: dict[str, np.ndarray], observations: np.ndarray) -> None:
        import torch

        self.network.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        if self.int8:
            self.int8.quantize(torch.as_tensor(observations))


def acting_policy(
    spec: NetworkSpec,
    inference: str = "float32",
    seed: int = 0,
    observations: np.ndarray | None = None,
    exploring: bool = False,
) -> ActingPolicy:
    """numpy for a plain MLP, torch otherwise; int8 calibrates on `observations` until
    the first weights are loaded; `exploring` (a collector's copy) acts on fresh noise
    when the network is noisy."""
    if spec.resolved_torso() == "mlp" and inference != "float32":
        raise ValueError(f"collectors.inference: {inference} is for image observations")
    if spec.plain_mlp():
        return NumpyMLPPolicy(spec, seed)
    return TorchPolicy(spec, inference, observations, exploring, seed)
