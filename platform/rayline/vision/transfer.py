"""Transfer learning with torchvision backbones: a pretrained network whose classifier
head is replaced for the new classes, then fine-tuned as a whole, used as a fixed
feature extractor that only the new head learns on top of, or in between (`partial`):
the last N stages of the backbone train, the earlier ones stay fixed.

A backbone's stages, in order: the blocks of its `features` sequence (MobileNet,
EfficientNet, ConvNeXt, VGG, DenseNet, ...), or else its top-level modules with
parameters before the head (ResNet: conv1, bn1, layer1..layer4; RegNet: stem,
trunk_output). Layers after the last stage (MobileNetV3's first classifier layer) train
with the head.

The loops follow torchvision's classification reference (references/classification):
`train_one_epoch` and `evaluate`. Plain functions, testable without Ray: the epoch loop
and its checkpoints are in vision/training.py, the Tune plumbing in vision/classification.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from rayline.config import ConfigError
from rayline.fs import filesystem

Mode = Literal["finetune", "feature_extract", "partial"]


REGISTRY_SCHEME = "registry://"


def build_model(
    arch: str, num_classes: int, weights: str = "none", store_uri: str = "./artifacts"
) -> tuple[nn.Module, str]:
    """torchvision's `arch` (see `pretrained`) with its last linear layer replaced by a
    fresh one for `num_classes`, and that layer's qualified name (the head)."""
    model = pretrained(arch, weights, store_uri)
    head = last_linear(model)
    old = model.get_submodule(head)
    _set_submodule(model, head, nn.Linear(old.in_features, num_classes))
    return model, head


def pretrained(arch: str, weights: str, store_uri: str = "./artifacts") -> nn.Module:
    """torchvision's classification model `arch` with `weights`: `none` (random),
    `imagenet` (torchvision's default pretrained weights, downloaded once into
    $TORCH_HOME), `registry://NAME@ALIAS` or `@VERSION` (the backbone of a classifier
    rayline registered in `store_uri`, its head left fresh), or the path/URI of a
    state_dict for `arch` saved with torch.save (read with weights_only=True, never
    unpickled)."""
    from torchvision import models

    if arch not in models.list_models(module=models):
        raise ConfigError(f"model.arch: {arch!r} is not a torchvision classification model")
    if weights == "imagenet":
        default = models.get_model_weights(arch).DEFAULT
        try:
            return models.get_model(arch, weights=default)
        except OSError as exc:  # URLError is an OSError
            raise ConfigError(
                f"model.weights: cannot fetch {arch}'s ImageNet weights from {default.url} "
                f"({exc}); without internet put that file in $TORCH_HOME/hub/checkpoints/ "
                "or give model.weights the path of a saved state_dict"
            ) from None
    model = models.get_model(arch, weights=None)
    if weights.startswith(REGISTRY_SCHEME):
        load_backbone(model, registered_weights(weights, arch, store_uri), weights)
        return model
    if weights != "none":
        try:
            model.load_state_dict(read_state_dict(weights, "model.weights"))
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
            first = str(exc).splitlines()[1:2] or [str(exc)]
            raise ConfigError(
                f"model.weights: {weights!r} does not fit {arch}: {first[0].strip()}"
            ) from None
    return model


def registered_weights(ref: str, arch: str, store_uri: str) -> dict[str, torch.Tensor]:
    """The weights of a classifier registered by rayline: `registry://NAME[@ALIAS|@VERSION]`
    in the store at `store_uri` (latest when no @)."""
    from rayline.store import ModelRegistry, RegistryError
    from rayline.vision.training import BEST_FILE, META_FILE

    name, _, version = ref[len(REGISTRY_SCHEME) :].partition("@")
    try:
        registry = ModelRegistry(store_uri, create=False, read_only=True)
        source = registry.get(name, version or "latest")
        meta = json.loads(registry.read_file(source, META_FILE))
        blob = registry.read_file(source, BEST_FILE)
    except (RegistryError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model.weights: {ref} in {store_uri}: {exc}") from None
    if meta.get("arch") != arch:
        raise ConfigError(
            f"model.weights: {ref} is {name} v{source.version}, a {meta.get('arch')} "
            f"classifier; model.arch is {arch}"
        )
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of `state` but the classifier head's into `model` (whose head is
    replaced next); layers that do not fit are named."""
    head = last_linear(model)
    backbone = {k: v for k, v in state.items() if not (k == head or k.startswith(head + "."))}
    own = model.state_dict()
    misfits = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in backbone.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in backbone and not k.startswith(head + ".")]
    unexpected = [k for k in backbone if k not in own]
    if misfits or missing or unexpected:
        problems = [f"shapes differ: {', '.join(misfits[:5])}"] if misfits else []
        problems += [f"missing: {', '.join(missing[:5])}"] if missing else []
        problems += [f"not in the model: {', '.join(unexpected[:5])}"] if unexpected else []
        raise ConfigError(f"model.weights: {source} does not fit: {'; '.join(problems)}")
    model.load_state_dict(backbone, strict=False)


def read_state_dict(uri: str, what: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local path or URI, loaded without unpickling arbitrary objects."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as stream:
            blob = stream.read()
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file {uri!r}") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or OSError
        raise ConfigError(f"{what}: {uri!r} is not a loadable state_dict ({exc})") from None


def last_linear(model: nn.Module) -> str:
    """The qualified name of the model's last nn.Linear: torchvision's classifier head."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"model.arch: {type(model).__name__} has no linear classifier head")
    return names[-1]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def head_parameters(model: nn.Module, head: str) -> list[nn.Parameter]:
    return list(model.get_submodule(head).parameters())


def backbone_parameters(model: nn.Module, head: str) -> list[nn.Parameter]:
    ids = {id(p) for p in head_parameters(model, head)}
    return [p for p in model.parameters() if id(p) not in ids]


def stages(model: nn.Module, head: str) -> list[str]:
    """The backbone's stages, first to last (see the module docstring)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [f"features.{name}" for name, _ in features.named_children()]
    return [
        name
        for name, module in model.named_children()
        if not head.startswith(name) and any(True for _ in module.parameters())
    ]


def frozen_modules(model: nn.Module, head: str, mode: Mode, trainable_stages: int) -> list[str]:
    """The modules whose weights and batch-norm statistics stay fixed in `mode`."""
    if mode == "finetune":
        return []
    if mode == "feature_extract":  # everything but the head (and its enclosing modules)
        return [
            name
            for name, _ in model.named_modules()
            if name
            and name != head
            and not name.startswith(head + ".")
            and not head.startswith(name + ".")
        ]
    backbone = stages(model, head)
    if not 1 <= trainable_stages <= len(backbone):
        raise ConfigError(
            f"model.trainable_stages: {type(model).__name__} has {len(backbone)} stages "
            f"({', '.join(backbone)}); got {trainable_stages}"
        )
    return backbone[: len(backbone) - trainable_stages]


def prepare_mode(model: nn.Module, head: str, mode: Mode, trainable_stages: int = 1) -> None:
    """Freeze the parameters of the modules `mode` keeps fixed."""
    model.requires_grad_(True)
    for name in frozen_modules(model, head, mode, trainable_stages):
        model.get_submodule(name).requires_grad_(False)


def set_training(model: nn.Module, head: str, mode: Mode, trainable_stages: int = 1) -> None:
    """model.train(), except that fixed modules stay in eval mode: frozen weights are not
    enough, batch norm would still move its running statistics and change the features
    under the layers that learn."""
    model.train()
    for name in frozen_modules(model, head, mode, trainable_stages):
        model.get_submodule(name).eval()


def parameter_groups(
    model: nn.Module, head: str, mode: Mode, lr: float, backbone_lr_scale: float
) -> list[dict]:
    """The optimiser's groups: the head at `lr`; the backbone's trainable parameters (all
    when fine-tuning, the last stages' in `partial`) at `lr * backbone_lr_scale`
    (pretrained layers usually want a smaller step)."""
    groups = [{"params": head_parameters(model, head), "lr": lr}]
    trainable = [p for p in backbone_parameters(model, head) if p.requires_grad]
    if mode != "feature_extract" and trainable:
        groups.append({"params": trainable, "lr": lr * backbone_lr_scale})
    return groups


@torch.no_grad()
def adapt_batch_norm(model: nn.Module, loader, device: torch.device) -> None:
    """AdaBN (Li et al., 2016): every batch-norm layer's running statistics re-estimated
    on `loader`'s images (labels unused), each batch counting alike; no weight changes.
    A frozen backbone then normalises the new data by its own statistics instead of the
    source's, which is most of what a shift in the images (another camera, noise)
    changes in its features."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    for images, _ in loader:
        model(images.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


Precision = Literal["float32", "bfloat16"]


@contextlib.contextmanager
def training_speedups(
    model: nn.Module, device: torch.device, precision: Precision, channels_last: bool
) -> Iterator[torch.memory_format]:
    """Train steps under bfloat16 autocast and/or in the channels-last (NHWC) layout;
    yields the layout the images should take. The model returns to float32 weights in
    the default layout after, so validation, the saved weights and serving see exactly
    what a fresh model loaded from them does."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            yield layout
    finally:
        model.to(memory_format=torch.contiguous_format)


def train_one_epoch(
    model: nn.Module,
    head: str,
    mode: Mode,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    trainable_stages: int = 1,
    precision: Precision = "float32",
    channels_last: bool = False,
) -> dict[str, float]:
    """One pass over `loader`: mean loss and accuracy over its samples, and images/s."""
    set_training(model, head, mode, trainable_stages)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    with training_speedups(model, device, precision, channels_last) as layout:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=layout)
            targets = targets.to(device)
            output = model(images)
            loss = criterion(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(targets)
            correct += (output.argmax(1) == targets).sum().item()
            seen += len(targets)
    return {
        "loss": total_loss / seen,
        "accuracy": correct / seen,
        "images_per_s": seen / (time.perf_counter() - started),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, loader, device: torch.device
) -> dict[str, float]:
    """Mean loss, top-1 accuracy and the count of samples over `loader`, in eval mode."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        output = model(images)
        total_loss += criterion(output, targets).item() * len(targets)
        correct += (output.argmax(1) == targets).sum().item()
        seen += len(targets)
    if not seen:
        return {"loss": math.nan, "accuracy": math.nan, "samples": 0}
    return {"loss": total_loss / seen, "accuracy": correct / seen, "samples": seen}
