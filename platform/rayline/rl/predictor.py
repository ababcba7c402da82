"""The DQN family's served model: a registered policy answering observations with greedy
actions and Q-values (POST /dqn/{model}/act)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from rayline.drift import PROFILE_FILE, drift_window
from rayline.numbers import nested_float32_problem
from rayline.rl.config import channels_last
from rayline.rl.networks import NetworkSpec, build_q_network
from rayline.serving.base import BadInput, registered
from rayline.store import ModelRegistry

FRAME_FEATURES = ["brightness", "contrast", "motion"]
"""What drift watches of an image stack (frames x height x width, grey levels 0-255):
the last frame's mean and standard deviation and its mean absolute change from the
frame before, on 0-1. A different game, lighting or a frozen feed shows in them; 28,224
pixels one by one would show only noise."""


INLINE_MAX_MULTIPLY_ADDS = 1_000_000
"""A batch whose forward pass takes fewer multiply-adds than this (a CartPole MLP on a
hundred observations: tens of microseconds) is computed on the replica's event loop:
handing it to a worker thread cost more than the pass itself (concurrency 1: 805 -> 1,057
requests a second, docs/benchmarks.md). Convolutional policies always go to a thread."""


def multiply_adds_per_row(network: torch.nn.Module) -> int | None:
    """The forward pass's multiply-adds per observation for a network of linear layers
    (their weights' sizes); None for any other (a convolution's cost depends on the
    image's size)."""
    layers = list(network.modules())
    if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in layers):
        return None
    return sum(m.weight.numel() for m in layers if isinstance(m, torch.nn.Linear))


def observation_features(observations: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(rows x features, their names) that drift watches of a batch of observations:
    each dimension of a vector (`obs[i]`), FRAME_FEATURES of an image stack."""
    rows = observation_rows(observations)
    if observations.ndim == 2:
        return rows, [f"obs[{i}]" for i in range(observations.shape[1])]
    return rows, FRAME_FEATURES


def observation_rows(observations: np.ndarray) -> np.ndarray:
    """observation_features' rows alone (what a served batch adds to the drift window):
    a batch of vectors as it is, three numbers per image stack."""
    if observations.ndim == 2:
        return observations
    if observations.ndim == 4 and channels_last(observations.shape[1:]):
        observations = np.moveaxis(observations, -1, 1)  # MinAtar's (10, 10, C): channels
    frames = observations.reshape(len(observations), observations.shape[1], -1)
    last = frames[:, -1].astype(np.float32) / 255.0
    before = frames[:, -2 if frames.shape[1] > 1 else -1].astype(np.float32) / 255.0
    return np.stack([last.mean(1), last.std(1), np.abs(last - before).mean(1)], axis=1)


class DQNPolicy:
    """A registered DQN policy: observations -> greedy actions and Q-values."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        self.version = registered(registry, name, ref, "dqn", "a DQN policy")
        self.spec = NetworkSpec(**json.loads(registry.read_file(self.version, "network.json")))
        state = torch.load(
            io.BytesIO(registry.read_file(self.version, "policy.pt")), weights_only=True
        )
        torch.set_num_threads(1)
        self.network = build_q_network(self.spec).eval()
        self.network.load_state_dict(state)
        self.multiply_adds_per_row = multiply_adds_per_row(self.network)
        self.numbers_per_observation = int(np.prod(self.spec.obs_shape))
        stored = [PROFILE_FILE] if PROFILE_FILE in self.version.files else []
        self.drift = drift_window({f: registry.read_file(self.version, f) for f in stored})
        """What this replica was asked, against the registration's own episodes."""

    def check(self, observations: Any) -> np.ndarray:
        """One observation or a batch, as a float32 array of shape (batch, *obs_shape):
        nested lists of JSON numbers, or an array whose numbers were checked already
        (the Open Inference Protocol's tensors)."""
        if isinstance(observations, np.ndarray):
            array = observations.astype(np.float32, copy=False)
        else:
            problem = nested_float32_problem(observations, "observations")
            if problem:
                raise BadInput(problem)
            try:
                array = np.asarray(observations, dtype=np.float32)
            except (ValueError, TypeError):
                raise BadInput(
                    "observations: expected numbers in nested lists of equal length"
                ) from None
        shape = tuple(self.spec.obs_shape)
        if array.shape == shape:
            array = array[None]
        if array.shape[1:] != shape or len(array) == 0:
            raise BadInput(
                f"observations: expected shape {list(shape)} or [batch, {', '.join(map(str, shape))}], "
                f"got {list(array.shape)}"
            )
        return array

    def tensors(self) -> tuple[list, list]:
        """The Open Inference Protocol's inputs and outputs (rayline.rl.routes.protocol)."""
        from rayline.serving.inference_protocol import TensorSpec

        # Pixels and bool grids are bytes (the network scales them); others float32.
        datatype = "UINT8" if self.spec.byte_observations() else "FP32"
        observations = TensorSpec("observations", datatype, (-1, *self.spec.obs_shape))
        actions = TensorSpec("actions", "INT64", (-1,))
        q_values = TensorSpec("q_values", "FP32", (-1, self.spec.n_actions))
        return [observations], [actions, q_values]

    def cheap(self, rows: int) -> bool:
        """Whether acting on `rows` observations is cheaper than a thread hop
        (INLINE_MAX_MULTIPLY_ADDS)."""
        per_row = self.multiply_adds_per_row
        return per_row is not None and rows * per_row <= INLINE_MAX_MULTIPLY_ADDS

    @torch.inference_mode()
    def act(self, observations: Any) -> dict[str, list]:
        """Greedy actions for observations (checked here unless they come from `check`)."""
        observations = self.check(observations)  # an array from `check` passes at once
        q_values = self.network(torch.from_numpy(observations))
        actions = q_values.argmax(dim=1)
        if self.drift is not None:
            self.drift.add(observation_rows(observations), actions.numpy())
        return {"actions": actions.tolist(), "q_values": q_values.tolist()}
