"""The vision family's HTTP routes: POST /vision/{model}/classify (base64 image files ->
top-k classes) and POST /vision/{model}/segment (-> a class for every pixel)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types.
from fastapi import APIRouter
from pydantic import BaseModel, Field

from rayline.serving.base import BadInput
from rayline.serving.http import ERRORS, MAX_K, ModelsDep, json_response, refused
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
