"""Image classifiers and segmenters out of rayline: ONNX graphs that take the image's
8-bit pixels and do the served scaling and normalisation inside, with the resizing the
served predictor does first written down exactly in `preprocessing.json`
(rayline.export)."""

from __future__ import annotations

import json
import os

import torch

from rayline.vision.presets import IMAGENET_MEAN, IMAGENET_STD

CLASSIFIER_FILE = "classifier.onnx"
SEGMENTER_FILE = "segmenter.onnx"
PREPROCESSING_FILE = "preprocessing.json"


class FromPixels(torch.nn.Module):
    """uint8 (N, 3, H, W) pixels -> what the network was given in serving: scaled to
    [0, 1] and normalised with the ImageNet statistics (rayline.vision.presets)."""

    def __init__(self, network: torch.nn.Module, head: str):
        super().__init__()
        self.network, self.head = network, head
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor):
        scores = self.network((pixels.float() / 255.0 - self.mean) / self.std)
        if self.head == "probabilities":
            return torch.softmax(scores, dim=1)
        return scores.argmax(dim=1).to(torch.uint8)


def _export(module: torch.nn.Module, example: torch.Tensor, dynamic: dict, output: str, path: str):
    import warnings

    with warnings.catch_warnings():  # the exporter's notes on its own internals
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (example,),
            input_names=["pixels"],
            output_names=[output],
            dynamic_shapes={"pixels": dynamic},
            dynamo=True,
            verbose=False,
        )
    program.save(path)


def onnx_classifier(service, folder: str) -> list[str]:
    """`classifier.onnx`: `pixels` UINT8 [batch, 3, crop, crop] -> `probabilities` FP32
    [batch, classes] (softmax, the classes in model.json's order); preprocessing.json
    says how the served predictor gets from an image file to those pixels."""
    transform = service.transform.transforms  # Resize, CenterCrop, then the in-graph part
    resize, crop = transform[0], transform[1]
    size = crop.size[0]
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    module = FromPixels(service.network, "probabilities")
    _export(module, example, {0: batch}, "probabilities", os.path.join(folder, CLASSIFIER_FILE))
    steps = {
        "decode": "the image file to RGB, 8 bits a channel (PIL: Image.open(f).convert('RGB'))",
        "resize": {
            "shorter_side": resize.size[0] if isinstance(resize.size, list) else resize.size,
            "interpolation": "bilinear, antialiased (torchvision v2.Resize on a PIL image: "
            "PIL's Image.resize with BILINEAR)",
        },
        "center_crop": [size, size],
        "layout": "channels first, [batch, 3, height, width], uint8",
        "in_graph": "x / 255, then (x - mean) / std per channel",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "classes": service.classes,
    }
    _write(folder, steps)
    return [CLASSIFIER_FILE, PREPROCESSING_FILE]


def onnx_segmenter(service, folder: str) -> list[str]:
    """`segmenter.onnx`: `pixels` UINT8 [batch, 3, height, width], any size -> `masks`
    UINT8 [batch, height, width] (class indices into model.json's classes)."""
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=32, max=4096)
    width = torch.export.Dim("width", min=32, max=4096)
    example = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    module = FromPixels(service.network, "masks")
    _export(
        module,
        example,
        {0: batch, 2: height, 3: width},
        "masks",
        os.path.join(folder, SEGMENTER_FILE),
    )
    steps = {
        "decode": "the image file to RGB, 8 bits a channel (PIL: Image.open(f).convert('RGB'))",
        "resize": None,
        "layout": "channels first, [batch, 3, height, width], uint8; one size per batch",
        "in_graph": "x / 255, then (x - mean) / std per channel; the class of every pixel",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "classes": service.classes,
    }
    _write(folder, steps)
    return [SEGMENTER_FILE, PREPROCESSING_FILE]


def _write(folder: str, steps: dict) -> None:
    with open(os.path.join(folder, PREPROCESSING_FILE), "w") as f:
        json.dump(steps, f, indent=2)
