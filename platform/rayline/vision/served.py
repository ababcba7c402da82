"""What the vision family serves (rayline.family.SERVING): light to import; torch and
torchvision are imported when a replica loads a model."""

from __future__ import annotations

import io

import numpy as np

from rayline.serving.base import ServedKind, post_example, share_equal
from rayline.store import ModelRegistry


def load_classifier_service(registry: ModelRegistry, name: str, ref):
    from rayline.vision.predictors import ImageClassifierService

    return ImageClassifierService(registry, name, ref)


def load_segmenter_service(registry: ModelRegistry, name: str, ref):
    from rayline.vision.predictors import SegmenterService

    return SegmenterService(registry, name, ref)


IMAGE_BODY = '{"images": ["\'"$(base64 -w0 IMAGE.png)"\'"]}'


def _same_top_class(method: str, a: dict, b: dict) -> dict[str, float]:
    top = [[p[0]["class"] for p in answer["predictions"]] for answer in (a, b)]
    return {"agreement": share_equal(*top)}


def _pixel_agreement(method: str, a: dict, b: dict) -> dict[str, float]:
    """The share of pixels given the same class, over every image."""
    import base64

    from PIL import Image

    same = total = 0
    for ours, theirs in zip(a["predictions"], b["predictions"]):
        masks = [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(p["mask_png"]))))
            for p in (ours, theirs)
        ]
        same += int((masks[0] == masks[1]).sum())
        total += masks[0].size
    return {"agreement": same / total if total else 1.0}


def classifier_routes():
    from rayline.vision.routes import classifier_router

    return classifier_router()


def segmenter_routes():
    from rayline.vision.routes import segmenter_router

    return segmenter_router()


def classifier_protocol():
    from rayline.vision.routes import classifier_protocol

    return classifier_protocol()


def segmenter_protocol():
    from rayline.vision.routes import segmenter_protocol

    return segmenter_protocol()


def classifier_exports():
    from rayline.vision.export import onnx_classifier

    return {"onnx": onnx_classifier}


def segmenter_exports():
    from rayline.vision.export import onnx_segmenter

    return {"onnx": onnx_segmenter}


SERVED = {
    "image_classifier": ServedKind(
        "image classifier",
        load_classifier_service,
        classifier_routes,
        lambda url, name, version, registry: [
            post_example(f"{url}/vision/{name}/classify", IMAGE_BODY)
        ],
        _same_top_class,
        classifier_protocol,
        classifier_exports,
    ),
    "segmenter": ServedKind(
        "segmentation model",
        load_segmenter_service,
        segmenter_routes,
        lambda url, name, version, registry: [
            post_example(f"{url}/vision/{name}/segment", IMAGE_BODY)
        ],
        _pixel_agreement,
        segmenter_protocol,
        segmenter_exports,
    ),
}
