"""The vision family's served models: image classifiers (POST /vision/{model}/classify)
and segmentation models (POST /vision/{model}/segment), from base64 image files."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from rayline.drift import build_profile, drift_window
from rayline.serving.base import BadInput, TooLarge, registered
from rayline.store import ModelRegistry
from rayline.vision import fcn, transfer
from rayline.vision.limits import (
    IMAGE_FORMATS,
    MAX_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_REQUEST_PIXELS,
    MAX_SEGMENT_PIXELS,
)
from rayline.vision.training import BEST_FILE, META_FILE

IMAGE_FEATURES = ["brightness", "contrast", "width", "height"]
"""What an image is, for drift: the mean and standard deviation of its grey levels (0-1)
and its size in pixels, before any transform."""
PROFILE_IMAGES = 500


def image_stats(images: list) -> np.ndarray:
    """IMAGE_FEATURES of each image: rows x features. From the grey image's histogram
    (PIL's ImageStat): no array of floats the size of the image (4096 x 4096 pixels
    held 128 MB more that way)."""
    from PIL import ImageStat

    rows = []
    for image in images:
        grey = ImageStat.Stat(image.convert("L"))
        rows.append([grey.mean[0] / 255.0, grey.stddev[0] / 255.0, image.width, image.height])
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(IMAGE_FEATURES))


def image_profile(images: list, outputs: list[int], classes: int) -> dict:
    """The reference profile stored at registration (rayline.drift) from training images
    and one class per image (a classifier's labels: the class prior; a segmenter's
    masks: each one's commonest class)."""
    return build_profile(
        image_stats(images), IMAGE_FEATURES, np.asarray(outputs), list(range(classes))
    )


def profile_sample(count: int, seed: int = 0) -> np.ndarray:
    """The training images a profile is made of: all, or PROFILE_IMAGES of them."""
    if count <= PROFILE_IMAGES:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, PROFILE_IMAGES, replace=False))


def load_classifier(files: dict[str, bytes]) -> tuple[nn.Module, dict]:
    """The network saved as best.pt + model.json, in eval mode on the CPU."""
    meta = json.loads(files[META_FILE])
    model, _ = transfer.build_model(meta["arch"], len(meta["classes"]), "none")
    state = torch.load(io.BytesIO(files[BEST_FILE]), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def load_segmenter(files: dict[str, bytes]) -> tuple[fcn.FCN, dict]:
    """The FCN saved as best.pt + model.json, in eval mode on the CPU."""
    meta = json.loads(files[META_FILE])
    model = fcn.FCN(meta["arch"], len(meta["classes"]), meta["variant"], "none")
    state = torch.load(io.BytesIO(files[BEST_FILE]), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


class ImageClassifierService:
    """A registered image classifier: images (PNG, JPEG, ...) -> the top-k classes."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        from rayline.vision.presets import eval_transform

        self.version = registered(registry, name, ref, "image_classifier", "an image classifier")
        files = registry.read_files(self.version)
        torch.set_num_threads(1)
        self.network, meta = load_classifier(files)
        self.classes = meta["classes"]
        self.transform = eval_transform(meta["crop_size"], meta["resize_size"])
        self.drift = drift_window(files)
        """What this replica was shown and answered, against training (rayline.drift)."""

    def predict(self, images: list[str], k: int) -> dict[str, Any]:
        """Base64-encoded image files -> per image, the k most probable classes."""
        decoded = decode_images(images)
        answers = self.classify(torch.stack([self.transform(image) for image in decoded]), k)
        if self.drift is not None:
            top = [self.classes.index(answer[0]["class"]) for answer in answers]
            self.drift.add(image_stats(decoded), np.array(top))
        return {"predictions": answers}

    def tensors(self) -> tuple[list, list]:
        """The Open Inference Protocol's inputs and outputs (rayline.vision.routes)."""
        from rayline.serving.inference_protocol import TensorSpec

        return [TensorSpec("images", "BYTES", (-1,))], [
            TensorSpec("labels", "BYTES", (-1, -1)),
            TensorSpec("probabilities", "FP32", (-1, -1)),
        ]

    def classify(self, batch: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Per image, the k most probable classes with their probabilities."""
        with torch.inference_mode():
            probabilities = torch.softmax(self.network(batch), dim=1)
        top = probabilities.topk(min(k, len(self.classes)), dim=1)
        return [
            [
                {"class": self.classes[c], "probability": p}
                for c, p in zip(idx.tolist(), val.tolist())
            ]
            for idx, val in zip(top.indices, top.values)
        ]


def decode_images(images: list[str], max_pixels: int = MAX_REQUEST_PIXELS) -> list:
    """Base64-encoded image files -> RGB PIL images, once `opened_images` has checked
    them all."""
    from PIL import Image

    decoded = []
    for i, image in enumerate(opened_images(images, max_pixels)[0]):
        try:
            if image.mode == "RGB":  # convert would copy it
                image.load()
                decoded.append(image)
            else:
                decoded.append(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            raise BadInput(f"images[{i}]: not an image file Pillow can read") from None
    return decoded


def opened_images(images: list[str], max_pixels: int = MAX_REQUEST_PIXELS) -> tuple[list, int]:
    """Base64-encoded image files -> (the opened, undecoded PIL images, their pixels
    together). Every image's format and size are read from its header and checked
    against the limits (rayline.vision.limits; at most `max_pixels` together), so that
    nothing is decoded before all are counted: a small file can decode to hundreds of
    megapixels. About a millisecond for a 1 MiB body: a route counts on the event loop.
    BadInput names the first bad one; TooLarge the limit it passed."""
    import base64
    import binascii

    from PIL import Image, UnidentifiedImageError

    if not images:
        raise BadInput("images: expected at least one base64-encoded image")
    if len(images) > MAX_IMAGES:
        raise TooLarge(f"images: {len(images)} in one request, over the limit of {MAX_IMAGES}")
    opened, total = [], 0
    for i, text in enumerate(images):
        try:
            blob = base64.b64decode(text, validate=True)
            image = Image.open(io.BytesIO(blob))  # reads the header only
        except (binascii.Error, ValueError):
            raise BadInput(f"images[{i}]: not valid base64") from None
        except (UnidentifiedImageError, OSError):
            raise BadInput(f"images[{i}]: not an image file Pillow can read") from None
        except Image.DecompressionBombError:
            raise TooLarge(f"images[{i}]: over {MAX_IMAGE_PIXELS:,} pixels") from None
        if image.format not in IMAGE_FORMATS:
            raise BadInput(
                f"images[{i}]: {image.format} files are not accepted "
                f"(accepted: {', '.join(IMAGE_FORMATS)})"
            )
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise TooLarge(
                f"images[{i}]: {width}x{height} is over the limit of {MAX_IMAGE_PIXELS:,} pixels"
            )
        if min(width, height) == 0 or max(width, height) > MAX_ASPECT * min(width, height):
            raise TooLarge(
                f"images[{i}]: {width}x{height} is more than {MAX_ASPECT} times as long as wide"
            )
        total += width * height
        if total > max_pixels:
            raise TooLarge(
                f"images[0..{i}]: {total:,} pixels together, over the limit of "
                f"{max_pixels:,} for one request"
            )
        opened.append(image)
    return opened, total


class SegmenterService:
    """A registered FCN: images -> a class for every pixel."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        from rayline.vision.presets import whole_image_transform

        self.version = registered(registry, name, ref, "segmenter", "a segmentation model")
        files = registry.read_files(self.version)
        torch.set_num_threads(1)
        self.network, meta = load_segmenter(files)
        self.classes = meta["classes"]
        self.transform = whole_image_transform()
        self.drift = drift_window(files)
        """What this replica was shown and answered, against training (rayline.drift)."""

    def tensors(self) -> tuple[list, list]:
        """The Open Inference Protocol's inputs and outputs (rayline.vision.routes)."""
        from rayline.serving.inference_protocol import TensorSpec

        return [TensorSpec("images", "BYTES", (-1,))], [
            TensorSpec("masks", "UINT8", (-1, -1, -1)),
            TensorSpec("classes", "BYTES", (len(self.classes),)),
        ]

    def predict(self, images: list[str]) -> dict[str, Any]:
        """Per image: its mask as a base64 PNG whose pixels are class indices (into
        `classes`), and the share of the pixels given to each class."""
        import base64

        from PIL import Image

        answers, decoded, commonest = [], decode_images(images, MAX_SEGMENT_PIXELS), []
        for image in decoded:
            with torch.inference_mode():
                mask = self.network(self.transform(image)[None])[0].argmax(0).to(torch.uint8)
            counts = torch.bincount(mask.flatten().long(), minlength=len(self.classes))
            commonest.append(int(counts.argmax()))
            buffer = io.BytesIO()
            Image.fromarray(mask.numpy(), mode="L").save(buffer, format="PNG")
            answers.append(
                {
                    "width": image.width,
                    "height": image.height,
                    "mask_png": base64.b64encode(buffer.getvalue()).decode(),
                    "pixels": {
                        name: float(count) / mask.numel()
                        for name, count in zip(self.classes, counts.tolist())
                    },
                }
            )
        if self.drift is not None:
            self.drift.add(image_stats(decoded), np.array(commonest))
        return {"classes": self.classes, "predictions": answers}
