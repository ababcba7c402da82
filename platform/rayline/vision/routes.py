"""The vision family's HTTP routes: POST /vision/{model}/classify (base64 image files ->
top-k classes) and POST /vision/{model}/segment (-> a class for every pixel)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, Field

from rayline.serving.base import BadInput, TooLarge
from rayline.serving.http import ERRORS, MAX_K, Models, ModelsDep, json_response, refused
from rayline.vision.limits import (
    HEAVY_CLASSIFY_PIXELS,
    HEAVY_SEGMENT_PIXELS,
    MAX_IMAGES,
    MAX_REQUEST_PIXELS,
    MAX_SEGMENT_PIXELS,
)


def counted_pixels(images: list[str], max_pixels: int) -> int:
    """The request's pixels, every image's header checked against the limits before any
    work is queued (rayline.vision.predictors.opened_images): 400 or 413 here."""
    from rayline.vision.predictors import opened_images

    try:
        return opened_images(images, max_pixels)[1]
    except BadInput as exc:
        raise refused(exc) from None


class ClassifyRequest(BaseModel):
    images: list[str] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description="image files (PNG, JPEG, WebP or BMP), each base64-encoded; at most "
        "4096 x 4096 pixels each and together, no side over 16 times the other",
    )
    k: int = Field(3, ge=1, le=MAX_K, description="classes to return per image")


class ClassProbability(BaseModel):
    class_: str = Field(alias="class")
    probability: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[list[ClassProbability]]


class SegmentRequest(BaseModel):
    images: list[str] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description="image files (PNG, JPEG, WebP or BMP), each base64-encoded; at most "
        "4096 x 4096 pixels each and together, no side over 16 times the other",
    )


class SegmentedImage(BaseModel):
    width: int
    height: int
    mask_png: str = Field(description="base64 PNG; each pixel is a class index into `classes`")
    pixels: dict[str, float] = Field(description="class -> share of the image's pixels")


class SegmentResponse(BaseModel):
    model: str
    version: int
    classes: list[str]
    predictions: list[SegmentedImage]


def protocol_images(inputs: dict) -> list[str]:
    """The Open Inference Protocol's `images` tensor: base64-encoded image files, BYTES [N]."""
    images = inputs.get("images")
    if images is None or len(inputs) != 1 or images.ndim != 1:
        raise BadInput("inputs: expected one tensor, images, BYTES of shape [N]")
    if len(images) > MAX_IMAGES:
        raise TooLarge(f"images: {len(images)} images, at most {MAX_IMAGES}")
    return [str(image) for image in images]


async def classify_infer(
    models: Models, model: str, inputs: dict, parameters: dict, version: int | None
):
    """images BYTES [N] (base64 files) and the parameter k (default 3) -> labels BYTES
    [N, k] and probabilities FP32 [N, k], most probable first."""
    images = protocol_images(inputs)
    k = parameters.get("k", 3)
    if type(k) is not int or not 1 <= k <= MAX_K:
        raise BadInput(f"parameters.k: expected a whole number from 1 to {MAX_K}, got {k!r}")
    heavy = counted_pixels(images, MAX_REQUEST_PIXELS) > HEAVY_CLASSIFY_PIXELS
    version, answer = await models.call(
        model, "image_classifier", "predict", images, k, heavy=heavy, version=version
    )
    top = answer["predictions"]
    labels = np.array([[p["class"] for p in image] for image in top], dtype=object)
    probabilities = np.array([[p["probability"] for p in image] for image in top], np.float32)
    return version, {"labels": labels, "probabilities": probabilities}


async def segment_infer(
    models: Models, model: str, inputs: dict, parameters: dict, version: int | None
):
    """images BYTES [N] (base64 files of one size) -> masks UINT8 [N, H, W] (class
    indices) and classes BYTES [C] (their names)."""
    import base64
    import io

    from PIL import Image

    from rayline.vision.predictors import opened_images

    images = protocol_images(inputs)
    try:
        opened, pixels = opened_images(images, MAX_SEGMENT_PIXELS)
    except BadInput as exc:
        raise refused(exc) from None
    sizes = {image.size for image in opened}
    if len(sizes) > 1:
        raise BadInput(
            "images: one request's masks form one tensor [N, H, W]: send images of one size "
            f"(got {', '.join(f'{w}x{h}' for w, h in sorted(sizes))})"
        )
    heavy = pixels > HEAVY_SEGMENT_PIXELS
    version, answer = await models.call(
        model, "segmenter", "predict", images, heavy=heavy, version=version
    )
    masks = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(p["mask_png"]))), dtype=np.uint8)
            for p in answer["predictions"]
        ]
    )
    return version, {"masks": masks, "classes": np.array(answer["classes"], dtype=object)}


def classifier_protocol():
    from rayline.serving.inference_protocol import KindProtocol

    return KindProtocol("rayline_image_classifier", {"images": ("BYTES",)}, classify_infer)


def segmenter_protocol():
    from rayline.serving.inference_protocol import KindProtocol

    return KindProtocol("rayline_segmenter", {"images": ("BYTES",)}, segment_infer)


def classifier_router() -> APIRouter:
    routes = APIRouter(tags=["vision"])

    @routes.post("/vision/{model}/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(model: str, body: ClassifyRequest, models: ModelsDep):
        heavy = counted_pixels(body.images, MAX_REQUEST_PIXELS) > HEAVY_CLASSIFY_PIXELS
        version, answer = await models.call(
            model, "image_classifier", "predict", body.images, body.k, heavy=heavy
        )
        return json_response({"model": model, "version": version, **answer})

    return routes


def segmenter_router() -> APIRouter:
    routes = APIRouter(tags=["vision"])

    @routes.post("/vision/{model}/segment", response_model=SegmentResponse, responses=ERRORS)
    async def segment(model: str, body: SegmentRequest, models: ModelsDep):
        heavy = counted_pixels(body.images, MAX_SEGMENT_PIXELS) > HEAVY_SEGMENT_PIXELS
        version, answer = await models.call(model, "segmenter", "predict", body.images, heavy=heavy)
        return json_response({"model": model, "version": version, **answer})

    return routes
