"""Fully convolutional networks for semantic segmentation with learned upsampling.

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation"
(CVPR 2015, https://arxiv.org/abs/1411.4038). A classification backbone (here a
torchvision ResNet) without its pooling and classifier yields class scores at 1/32 of
the input. FCN-32s upsamples them to the input in one step; FCN-16s and FCN-8s first
fuse them with scores from the 1/16 and 1/8 layers (skip connections). Every upsampling
is a transposed convolution initialised as bilinear interpolation and then learned (or,
`upsampling="fixed_bilinear"`, kept as the interpolation: the baseline it must beat).
Score layers start at zero, so an untrained FCN predicts class 0 everywhere.

Also here: the segmentation metrics (pixel accuracy, per-class and mean IoU) and the
training and evaluation passes.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rayline.config import ConfigError
from rayline.vision.transfer import Precision, pretrained, training_speedups

IGNORE_INDEX = 255
"""Mask value for pixels that are not scored (object borders, unlabelled)."""
Variant = Literal["fcn32s", "fcn16s", "fcn8s"]
Upsampling = Literal["learned", "fixed_bilinear"]


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """ConvTranspose2d weights (channels, channels, 2f, 2f) that upsample each channel on
    its own by `factor` with bilinear interpolation."""
    size = 2 * factor
    centre = factor - 0.5  # taps sit between input pixels, as in interpolation
    taps = 1 - torch.abs(torch.arange(size, dtype=torch.float64) - centre) / factor
    kernel = torch.outer(taps, taps).float()
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = kernel
    return weight


def upsampling_layer(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learnable x`factor` upsampling, initialised as bilinear: with stride f, kernel
    2f and padding f/2, an input of n pixels becomes exactly n*f."""
    if factor < 2 or factor % 2:
        raise ValueError(f"upsampling factor must be even and >= 2, got {factor}")
    layer = nn.ConvTranspose2d(
        channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False
    )
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, factor))
    return layer


def _score(in_channels: int, num_classes: int) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FCN(nn.Module):
    """FCN-32s, -16s or -8s on a torchvision ResNet backbone."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        variant: Variant = "fcn8s",
        weights: str = "none",
        upsampling: Upsampling = "learned",
    ):
        super().__init__()
        if upsampling not in ("learned", "fixed_bilinear"):
            raise ConfigError(
                f"model.upsampling: expected learned or fixed_bilinear, got {upsampling!r}"
            )
        if not arch.startswith("resnet"):
            raise ConfigError(
                f"model.arch: the FCN is built on a ResNet (resnet18/34/50/...), got {arch!r}"
            )
        if variant not in ("fcn32s", "fcn16s", "fcn8s"):
            raise ConfigError(f"model.variant: expected fcn32s, fcn16s or fcn8s, got {variant!r}")
        resnet = pretrained(arch, weights)
        self.variant = variant
        self.stem = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1
        )
        self.layer2, self.layer3, self.layer4 = resnet.layer2, resnet.layer3, resnet.layer4
        widths = [self._width(layer) for layer in (self.layer2, self.layer3, self.layer4)]
        self.score32 = _score(widths[2], num_classes)
        if variant == "fcn32s":
            self.up_final = upsampling_layer(num_classes, 32)
        else:
            self.up32 = upsampling_layer(num_classes, 2)
            self.score16 = _score(widths[1], num_classes)
        if variant == "fcn16s":
            self.up_final = upsampling_layer(num_classes, 16)
        if variant == "fcn8s":
            self.up16 = upsampling_layer(num_classes, 2)
            self.score8 = _score(widths[0], num_classes)
            self.up_final = upsampling_layer(num_classes, 8)
        if upsampling == "fixed_bilinear":  # the paper's baseline: interpolation, not learned
            for module in self.modules():
                if isinstance(module, nn.ConvTranspose2d):
                    module.weight.requires_grad_(False)

    @staticmethod
    def _width(layer: nn.Sequential) -> int:
        """Output channels of a ResNet stage (basic or bottleneck blocks)."""
        from torchvision.models.resnet import Bottleneck

        last = layer[-1]
        return (last.conv3 if isinstance(last, Bottleneck) else last.conv2).out_channels

    def parameter_groups(self, lr: float, backbone_lr_scale: float) -> list[dict]:
        """The optimiser's groups: scores and upsampling at `lr`, the pretrained backbone
        at `lr * backbone_lr_scale`."""
        backbone = [
            p for m in (self.stem, self.layer2, self.layer3, self.layer4) for p in m.parameters()
        ]
        inside = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in inside and p.requires_grad]
        return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, classes, H, W) scores, for any H and W: the input is
        padded to a multiple of 32 and the scores cropped back."""
        height, width = images.shape[-2:]
        x = F.pad(images, (0, -width % 32, 0, -height % 32))
        c8 = self.layer2(self.stem(x))
        c16 = self.layer3(c8)
        c32 = self.layer4(c16)
        # The scores, their fusion and upsampling in float32 even under autocast: with
        # them in bfloat16 too, FCN-8s reached mean IoU 0.24 where float32 reached 0.38
        # (10 epochs on make-shape-scenes, 2 seeds); with them in float32, 0.37 and 0.32.
        with torch.autocast(images.device.type, enabled=False):
            scores = self.score32(c32.float())
            if self.variant != "fcn32s":
                scores = self.up32(scores) + self.score16(c16.float())
            if self.variant == "fcn8s":
                scores = self.up16(scores) + self.score8(c8.float())
            return self.up_final(scores)[..., :height, :width]


def confusion(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts of target class (rows) against predicted (columns), over
    the pixels whose target is not IGNORE_INDEX."""
    scored = target != IGNORE_INDEX
    index = target[scored].long() * num_classes + predicted[scored].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy, and IoU per class averaged over the classes present in the target
    or the prediction (a class absent from both has no IoU), from a confusion matrix."""
    matrix = matrix.double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    present = union > 0
    total = matrix.sum()
    return {
        "pixel_accuracy": float(hits.sum() / total) if total else float("nan"),
        "mean_iou": float((hits[present] / union[present]).mean())
        if present.any()
        else float("nan"),
    }


def train_one_epoch(
    model,
    criterion,
    optimizer,
    loader,
    device,
    precision: Precision = "float32",
    channels_last: bool = False,
) -> dict[str, float]:
    """One pass over `loader` of (images, masks): mean loss per batch, and images/s."""
    model.train()
    total, batches, seen = 0.0, 0, 0
    started = time.perf_counter()
    with training_speedups(model, device, precision, channels_last) as layout:
        for images, masks in loader:
            images = images.to(device, non_blocking=True, memory_format=layout)
            masks = masks.to(device)
            loss = criterion(model(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
            seen += len(images)
    return {
        "loss": total / max(batches, 1),
        "images_per_s": seen / (time.perf_counter() - started),
    }


@torch.inference_mode()
def evaluate(model, criterion, loader, device, num_classes: int) -> dict[str, float]:
    """Mean loss per batch, pixel accuracy and mean IoU over `loader`, in eval mode."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total, batches = 0.0, 0
    for images, masks in loader:
        images, masks = images.to(device, non_blocking=True), masks.to(device)
        scores = model(images)
        total += criterion(scores, masks).item()
        batches += 1
        matrix += confusion(scores.argmax(1), masks, num_classes).cpu()
    return {"loss": total / max(batches, 1), **segmentation_scores(matrix)}
