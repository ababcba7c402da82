"""Q-networks: a torso chosen by the observation (an MLP for vectors, the Nature-DQN CNN
for Atari-size image stacks, MinAtar's small CNN for small images) and a Q-head.

The head optionally is dueling (Wang et al. 2016, https://arxiv.org/abs/1511.06581):
Q(s, a) = V(s) + A(s, a) - mean_a A(s, a); distributional (C51, Bellemare et al. 2017,
https://arxiv.org/abs/1707.06887): per action a softmax over return atoms, Q the
expectation, the dueling sum taken on the logits as in Rainbow; and noisy (Fortunato et
al. 2018, https://arxiv.org/abs/1706.10295): factorised Gaussian noisy layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayline.rl.config import NetworkSpec, channels_last


class NoisyLinear(nn.Linear):
    """A linear layer with learned factorised Gaussian noise: in training mode
    w = weight + weight_sigma * (f(eps_out) f(eps_in)^T), b = bias + bias_sigma * f(eps_out),
    f(x) = sign(x) sqrt(|x|), eps ~ N(0, 1) drawn by `reset_noise`; in eval mode it is the
    plain layer of its means (`weight`, `bias`), which is what evaluation and serving use."""

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5):
        super().__init__(in_features, out_features)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():  # the paper's initialisation of the means
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), sigma0 * bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), sigma0 * bound))
        self.register_buffer("eps_in", torch.zeros(in_features))
        self.register_buffer("eps_out", torch.zeros(out_features))
        self.reset_noise()

    @torch.no_grad()
    def reset_noise(self) -> None:
        self.eps_in.copy_(_scaled_noise(self.in_features, self.eps_in.device))
        self.eps_out.copy_(_scaled_noise(self.out_features, self.eps_out.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight + self.weight_sigma * torch.outer(self.eps_out, self.eps_in)
        return F.linear(x, weight, self.bias + self.bias_sigma * self.eps_out)


def _scaled_noise(size: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(size, device=device)
    return x.sign() * x.abs().sqrt()


def reset_noise(network: nn.Module) -> None:
    """Draw fresh noise in every noisy layer of `network` (none: nothing happens)."""
    for layer in network.modules():
        if isinstance(layer, NoisyLinear):
            layer.reset_noise()


class QHead(nn.Module):
    """Features -> Q-values: plain or dueling, one value or `atoms` logits per action."""

    def __init__(
        self,
        in_features: int,
        n_actions: int,
        hidden: int,
        dueling: bool,
        atoms: int = 1,
        support: tuple[float, float] = (-10.0, 10.0),
        noisy: bool = False,
        sigma0: float = 0.5,
    ):
        super().__init__()
        linear = functools.partial(NoisyLinear, sigma0=sigma0) if noisy else nn.Linear
        self.dueling, self.n_actions, self.atoms = dueling, n_actions, atoms
        self.advantage = nn.Sequential(
            linear(in_features, hidden), nn.ReLU(), linear(hidden, n_actions * atoms)
        )
        self.value = (
            nn.Sequential(linear(in_features, hidden), nn.ReLU(), linear(hidden, atoms))
            if dueling
            else None
        )
        if atoms > 1:
            self.register_buffer("support", torch.linspace(*support, atoms))

    def hidden_layers(self) -> list[nn.Linear]:
        """The layers before the ReLU: advantage's, then value's when dueling."""
        return [self.advantage[0]] + ([self.value[0]] if self.value is not None else [])

    def hidden(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(layer(features)) for layer in self.hidden_layers()]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(features))

    def logits(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """[batch, actions, atoms] from the hidden layers' activations (in hidden_layers'
        order), in float32 even under autocast: actions' values can differ by less than
        bfloat16 resolves at the scale of the values (0.03 at 5.0), and the greedy action,
        the Bellman target and the TD error all hang on those differences."""
        with torch.autocast(hidden[0].device.type, enabled=False):
            hidden = [h.float() for h in hidden]
            advantage = self.advantage[2](hidden[0]).view(-1, self.n_actions, self.atoms)
            if self.value is None:
                return advantage
            value = self.value[2](hidden[1]).view(-1, 1, self.atoms)
            return value + advantage - advantage.mean(dim=1, keepdim=True)

    def output(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Q-values: the logits themselves, or each action's expected return."""
        logits = self.logits(hidden)
        if self.atoms == 1:
            return logits.squeeze(2)
        return (logits.softmax(dim=2) * self.support).sum(dim=2)


class QNetwork(nn.Module):
    """Observations -> `body` (the torso) -> Q-head. Observations come in the env's dtype:
    uint8 pixels are divided by 255 here, bool grids become 0/1, channels-last images
    are turned channels-first."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        torso = spec.resolved_torso()
        self.pixel_divisor = 255.0 if spec.pixel_scale() != 1.0 else None
        self.channels_last = torso != "mlp" and channels_last(spec.obs_shape)
        self.body = build_torso(torso, spec)
        example = torch.zeros(1, *spec.obs_shape)
        with torch.no_grad():
            in_features = self.body(self.prepare_input(example)).shape[1]
        self.head = QHead(
            in_features,
            spec.n_actions,
            spec.hidden_sizes[-1],
            spec.dueling,
            atoms=spec.num_atoms,
            support=(spec.v_min, spec.v_max),
            noisy=spec.noisy,
            sigma0=spec.noisy_sigma0,
        )

    def prepare_input(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        if self.pixel_divisor is not None:
            x = x / self.pixel_divisor
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare_input(obs))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values [batch, actions] (C51: the expected returns)."""
        return self.head(self.features(obs))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """[batch, actions, atoms]: the head's values before softmax (atoms = 1: Q)."""
        return self.head.logits(self.head.hidden(self.features(obs)))


def build_torso(torso: str, spec: NetworkSpec) -> nn.Sequential:
    """`mlp`: Flatten, then ReLU layers of hidden_sizes but the last (the head's);
    `nature_cnn`: Mnih et al. 2015's three convolutions; `small_cnn`: Young and Tian
    2019's MinAtar network, one 3 x 3 convolution of 16 filters."""
    if torso == "mlp":
        in_features = int(np.prod(spec.obs_shape))
        layers: list[nn.Module] = [nn.Flatten()]
        for size in spec.hidden_sizes[:-1]:
            layers += [nn.Linear(in_features, size), nn.ReLU()]
            in_features = size
        return nn.Sequential(*layers)
    channels = spec.obs_shape[2] if channels_last(spec.obs_shape) else spec.obs_shape[0]
    if torso == "nature_cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
    if torso == "small_cnn":
        return nn.Sequential(nn.Conv2d(channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
    raise ValueError(f"network.torso: unknown torso {torso!r}")


def build_q_network(spec: NetworkSpec) -> QNetwork:
    if not spec.hidden_sizes:
        raise ValueError("network.hidden_sizes: expected at least one layer size")
    return QNetwork(spec)


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

    def __init__(self, network: QNetwork):
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
        x = self.network.prepare_input(observations)
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
                self.network.prepare_input(observations), 1.0 / ACTIVATION_LEVELS, 0, torch.quint8
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
