"""Image transforms, as torchvision's classification reference (presets.py) has them:
random resized crops and flips to train, resize then centre crop to evaluate and serve,
all normalised with the ImageNet statistics pretrained backbones were trained with.

The transforms are torchvision's v2: given an (image, tv_tensors.Mask) pair they crop and
flip both alike, resampling the mask nearest-neighbour so class indices stay indices.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalised() -> list:
    from torchvision.transforms import v2

    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transform(crop_size: int, horizontal_flip: bool = True):
    from torchvision.transforms import v2

    flip = [v2.RandomHorizontalFlip()] if horizontal_flip else []
    return v2.Compose(
        [v2.RandomResizedCrop(crop_size, scale=(0.5, 1.0), antialias=True), *flip, *_normalised()]
    )


def eval_transform(crop_size: int, resize_size: int):
    from torchvision.transforms import v2

    return v2.Compose(
        [v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size), *_normalised()]
    )


def whole_image_transform():
    """The whole image at its own size, for a network that scores every pixel."""
    from torchvision.transforms import v2

    return v2.Compose(_normalised())
