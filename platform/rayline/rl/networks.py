"""Q-networks: an MLP for vector observations, the Nature-DQN CNN for image stacks.

Both optionally end in a dueling head (Wang et al. 2016, https://arxiv.org/abs/1511.06581):
Q(s, a) = V(s) + A(s, a) - mean_a A(s, a).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rayline.rl.config import NetworkSpec


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

    def hidden_layers(self) -> list[nn.Linear]:
        """The layers before the ReLU: advantage's, then value's when dueling."""
        return [self.advantage[0]] + ([self.value[0]] if self.value is not None else [])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output([torch.relu(layer(features)) for layer in self.hidden_layers()])

    def output(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Q-values from the hidden layers' activations (in hidden_layers' order), in
        float32 even under autocast: actions' values can differ by less than bfloat16
        resolves at the scale of the values (0.03 at 5.0), and the greedy action, the
        Bellman target and the TD error all hang on those differences."""
        with torch.autocast(hidden[0].device.type, enabled=False):
            hidden = [h.float() for h in hidden]
            advantage = self.advantage[2](hidden[0])
            if self.value is None:
                return advantage
            return self.value[2](hidden[1]) + advantage - advantage.mean(dim=1, keepdim=True)


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


ACTIVATION_LEVELS = 127
"""int8 activations use 7 bits (0..127), as torch's x86 default does: without VNNI the
u8 x s8 pair sums of FBGEMM's kernels saturate at 16 bits with full-range activations."""


def quantized_engine() -> str | None:
    """The int8 kernels this CPU has (x86: FBGEMM/oneDNN; qnnpack on ARM), or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)


class Int8ActingNetwork:
    """An int8 copy of a Nature-CNN Q-network, for collectors to act with (ActorQ, in Krishnan
    et al.'s QuaRL, TMLR 2022): the conv torso and the head's hidden
    layers run in int8 (weights per output channel, activations per tensor), the last
    layer and the dueling sum stay float32. On one CPU core the float forward pass costs
    as much as a preprocessed Atari step; int8 takes about a third of it, and a collector
    acts with a policy one quantization step away from the learner's, as it already acts
    with weights a few hundred updates old.

    Built on torch's eager quantized modules (deprecated in torch 2.14 in favour of
    torchao; pyproject keeps torch below 2.15)."""

    def __init__(self, network: NatureCNNQNetwork):
        import torch.ao.nn.intrinsic.quantized as int8_layers

        engine = quantized_engine()
        if engine is None:
            raise RuntimeError("collectors.inference: int8: this torch has no int8 CPU kernels")
        torch.backends.quantized.engine = engine
        self.network = network
        """The float network: load weights into it, then call quantize()."""
        self.convs = [layer for layer in network.body if isinstance(layer, nn.Conv2d)]
        self.hidden = network.head.hidden_layers()
        with _quiet_deprecation():
            self.int8_convs = [
                int8_layers.ConvReLU2d(c.in_channels, c.out_channels, c.kernel_size, c.stride)
                for c in self.convs
            ]
            self.int8_hidden = [
                int8_layers.LinearReLU(h.in_features, h.out_features) for h in self.hidden
            ]
        self.quantized = False

    @torch.inference_mode()
    def quantize(self, observations: torch.Tensor) -> None:
        """Quantize the float network's current weights; each layer's output range is its
        largest activation on `observations` (the frames at hand)."""
        x = observations.float() / 255.0
        with _quiet_deprecation():
            for layer, int8_layer in zip(self.convs, self.int8_convs):
                x = torch.relu(layer(x))
                _set_int8(int8_layer, layer, x)
            features = x.flatten(1)
            for layer, int8_layer in zip(self.hidden, self.int8_hidden):
                _set_int8(int8_layer, layer, torch.relu(layer(features)))
        self.quantized = True

    @torch.inference_mode()
    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        """Q-values (float32) of a batch of uint8 frame stacks."""
        if not self.quantized:
            raise RuntimeError("Int8ActingNetwork: call quantize() after loading weights")
        with _quiet_deprecation():
            x = torch.quantize_per_tensor(
                observations.float() / 255.0, 1.0 / ACTIVATION_LEVELS, 0, torch.quint8
            )
            for int8_layer in self.int8_convs:
                x = int8_layer(x)
            features = x.reshape(x.shape[0], -1)
            hidden = [int8_layer(features).dequantize() for int8_layer in self.int8_hidden]
        return self.network.head.output(hidden)


def _set_int8(int8_layer: nn.Module, layer: nn.Conv2d | nn.Linear, output: torch.Tensor) -> None:
    weight = layer.weight.detach()
    scales = weight.abs().flatten(1).amax(dim=1).clamp(min=1e-8) / 127.0
    zero_points = torch.zeros(len(scales), dtype=torch.int64)
    int8_weight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    int8_layer.set_weight_bias(int8_weight, layer.bias.detach())
    int8_layer.scale = max(float(output.max()), 1e-6) / ACTIVATION_LEVELS
    int8_layer.zero_point = 0


@contextlib.contextmanager
def _quiet_deprecation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        yield


def greedy_actions(
    network: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[np.ndarray], np.ndarray]:
    """The greedy policy of a Q-network as a function on observation batches."""

    @torch.inference_mode()
    def act(obs: np.ndarray) -> np.ndarray:
        return network(torch.as_tensor(obs)).argmax(dim=1).numpy()

    return act
