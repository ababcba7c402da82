"""Prediction code behind every endpoint, as plain classes that tests call without Serve.

Each loads one registered model version (never unpickling) and validates its inputs:
bad input raises `BadInput` (HTTP 400/422), an unknown user or item `NotFound` (404).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayline.numbers import nested_float32_problem
from rayline.recsys import models as recsys_models
from rayline.recsys.knn import UserKNN
from rayline.rl.networks import NetworkSpec, build_q_network
from rayline.store import ModelRegistry, ModelVersion

EXPLAIN_TOP = 3
"""Neighbours named per recommended item: the most similar who rated it."""


class BadInput(ValueError):
    """The request's content cannot be used; the message says what was expected."""


class NotFound(LookupError):
    """The request names a user, item or model that does not exist."""


def describe(version: ModelVersion) -> dict[str, Any]:
    return {
        "name": version.name,
        "version": version.version,
        "kind": version.kind,
        "metrics": version.metrics,
        "created_at": version.created_at,
    }


def registered(registry: ModelRegistry, name: str, ref: str | int, kind: str, what: str):
    """The version `ref` of model `name`, which must be of `kind` (else BadInput)."""
    version = registry.get(name, ref)
    if version.kind != kind:
        raise BadInput(f"model {name!r} is a {version.kind} model, not {what}")
    return version


class DQNPolicy:
    """A registered DQN policy: observations -> greedy actions and Q-values."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        self.version = registered(registry, name, ref, "dqn", "a DQN policy")
        self.spec = NetworkSpec(**json.loads(registry.read_file(self.version, "network.json")))
        state = torch.load(
            io.BytesIO(registry.read_file(self.version, "policy.pt")), weights_only=True
        )
        torch.set_num_threads(1)
        self.network = build_q_network(self.spec).eval()
        self.network.load_state_dict(state)

    def check(self, observations: Any) -> np.ndarray:
        """One observation or a batch, as a float32 array of shape (batch, *obs_shape)."""
        problem = nested_float32_problem(observations, "observations")
        if problem:
            raise BadInput(problem)
        try:
            array = np.asarray(observations, dtype=np.float32)
        except (ValueError, TypeError):
            raise BadInput(
                "observations: expected numbers in nested lists of equal length"
            ) from None
        shape = tuple(self.spec.obs_shape)
        if array.shape == shape:
            array = array[None]
        if array.shape[1:] != shape or len(array) == 0:
            raise BadInput(
                f"observations: expected shape {list(shape)} or [batch, {', '.join(map(str, shape))}], "
                f"got {list(array.shape)}"
            )
        return array

    @torch.inference_mode()
    def act(self, observations: np.ndarray) -> dict[str, list]:
        """Greedy actions for checked observations (see `check`)."""
        q_values = self.network(torch.from_numpy(observations))
        return {"actions": q_values.argmax(dim=1).tolist(), "q_values": q_values.tolist()}


class RecommenderService:
    """A registered recommender addressed by the data's own user and item ids."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        self.version = registered(registry, name, ref, "recommender", "a recommender")
        self.model = recsys_models.load(registry.read_files(self.version))
        self.user_index = {str(u): i for i, u in enumerate(self.model.user_ids.tolist())}
        self.item_index = {str(item): i for i, item in enumerate(self.model.item_ids.tolist())}
        self.item_ids = [str(item) for item in self.model.item_ids.tolist()]
        # The cold-start answer: items by how many users rated them.
        self.popularity = np.asarray((self.model.seen > 0).sum(axis=0)).ravel().astype(np.float64)
        self.most_popular = np.argsort(-self.popularity, kind="stable")

    def _items(self, indices: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [
            {"item_id": self.item_ids[i], "score": float(s)}
            for i, s in zip(indices.tolist(), scores.tolist())
            if math.isfinite(s)
        ]

    def recommend(self, user_id: str, k: int) -> dict:
        """Top-k unseen items for a known user; an unknown user gets the most popular
        items, flagged `cold_start`."""
        user = self.user_index.get(str(user_id))
        if user is None:
            top = self.most_popular[:k]
            return {
                "user_id": user_id,
                "cold_start": True,
                "items": self._items(top, self.popularity[top]),
            }
        top, scores = self.model.recommend(np.array([user]), k)
        items = self._items(top[0], scores[0])
        if isinstance(self.model, UserKNN):  # the neighbours behind each recommendation
            indices = [self.item_index[entry["item_id"]] for entry in items]
            for entry, reasons in zip(items, self.model.explain(user, indices)):
                entry["because"] = [
                    {
                        "user_id": str(self.model.user_ids[r["user"]]),
                        "similarity": r["similarity"],
                        "rating": r["rating"],
                    }
                    for r in reasons[:EXPLAIN_TOP]
                ]
                entry["similar_users_who_rated"] = len(reasons)
        return {"user_id": user_id, "cold_start": False, "items": items}

    def recommend_new(self, ratings: dict[str, float], k: int) -> dict:
        """Top-k for someone not in training, from their ratings (item id -> rating)."""
        known = {
            self.item_index[str(i)]: r for i, r in ratings.items() if str(i) in self.item_index
        }
        if not known:
            raise BadInput("ratings: none of the rated items is known to the model")
        values = np.array(list(known.values()), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise BadInput("ratings: NaN or infinite values")
        items = np.array(list(known), dtype=np.int64)
        scores = self.model.score_new_user(items, values).astype(np.float64)
        scores[items] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        unknown = [str(i) for i in ratings if str(i) not in self.item_index]
        return {"items": self._items(top, scores[top]), "unknown_items": unknown}

    def similar(self, item_id: str, k: int) -> dict:
        item = self.item_index.get(str(item_id))
        if item is None:
            raise NotFound(f"item {item_id!r} is not known to model {self.version.name!r}")
        top, sims = self.model.similar_items(item, k)
        return {"item_id": item_id, "items": self._items(top, sims)}


class BoostedService:
    """A registered XGBoost model: rows of named features -> predictions."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        from rayline.boosting.model import BoostedModel

        self.version = registered(registry, name, ref, "xgboost", "an XGBoost model")
        self.model = BoostedModel.from_files(registry.read_files(self.version))

    def predict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Binary: the class and P(class 1); multiclass: the class and every class's
        probability; regression: the value."""
        from rayline.boosting.model import BadRows

        if not rows:
            raise BadInput("rows: expected at least one row")
        try:
            features = self.model.rows_to_features(rows)
        except BadRows as exc:
            raise BadInput(str(exc)) from None
        output = self.model.predict(features).astype(np.float64)
        kind = self.model.task.kind
        result: dict[str, Any] = {"task": kind}
        if kind == "binary":
            result["predictions"] = (output > 0.5).astype(int).tolist()
            result["probabilities"] = output.tolist()
        elif kind == "multiclass":
            result["predictions"] = output.argmax(axis=1).tolist()
            result["probabilities"] = output.tolist()
        else:
            result["predictions"] = output.tolist()
        return result


class ImageClassifierService:
    """A registered image classifier: images (PNG, JPEG, ...) -> the top-k classes."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        from rayline.vision.classification import load_classifier
        from rayline.vision.presets import eval_transform

        self.version = registered(registry, name, ref, "image_classifier", "an image classifier")
        files = registry.read_files(self.version)
        torch.set_num_threads(1)
        self.network, meta = load_classifier(files)
        self.classes = meta["classes"]
        self.transform = eval_transform(meta["crop_size"], meta["resize_size"])

    def predict(self, images: list[str], k: int) -> dict[str, Any]:
        """Base64-encoded image files -> per image, the k most probable classes."""
        return {"predictions": self.classify(self.check(images), k)}

    def check(self, images: list[str]) -> torch.Tensor:
        """Base64-encoded image files -> the network's input batch."""
        return torch.stack([self.transform(image) for image in decode_images(images)])

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


def decode_images(images: list[str]) -> list:
    """Base64-encoded image files -> RGB PIL images; BadInput names the first bad one."""
    import base64
    import binascii

    from PIL import Image, UnidentifiedImageError

    if not images:
        raise BadInput("images: expected at least one base64-encoded image")
    decoded = []
    for i, text in enumerate(images):
        try:
            blob = base64.b64decode(text, validate=True)
            decoded.append(Image.open(io.BytesIO(blob)).convert("RGB"))
        except (binascii.Error, ValueError):
            raise BadInput(f"images[{i}]: not valid base64") from None
        except (UnidentifiedImageError, OSError):
            raise BadInput(f"images[{i}]: not an image file Pillow can read") from None
        except Image.DecompressionBombError:  # a small file that decodes to gigapixels
            raise BadInput(f"images[{i}]: over {Image.MAX_IMAGE_PIXELS:,} pixels") from None
    return decoded


class SegmenterService:
    """A registered FCN: images -> a class for every pixel."""

    MAX_PIXELS = 4096 * 4096

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        from rayline.vision.presets import whole_image_transform
        from rayline.vision.segmentation import load_segmenter

        self.version = registered(registry, name, ref, "segmenter", "a segmentation model")
        files = registry.read_files(self.version)
        torch.set_num_threads(1)
        self.network, meta = load_segmenter(files)
        self.classes = meta["classes"]
        self.transform = whole_image_transform()

    def predict(self, images: list[str]) -> dict[str, Any]:
        """Per image: its mask as a base64 PNG whose pixels are class indices (into
        `classes`), and the share of the pixels given to each class."""
        import base64

        from PIL import Image

        answers = []
        for i, image in enumerate(decode_images(images)):
            if image.width * image.height > self.MAX_PIXELS:
                raise BadInput(f"images[{i}]: {image.width}x{image.height} is over 4096x4096")
            with torch.inference_mode():
                mask = self.network(self.transform(image)[None])[0].argmax(0).to(torch.uint8)
            counts = torch.bincount(mask.flatten().long(), minlength=len(self.classes))
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
        return {"classes": self.classes, "predictions": answers}


@dataclass(frozen=True)
class ServedKind:
    """How a registry kind is served: its predictor and the requests that show it."""

    load: Callable[[ModelRegistry, str, Any], Any]
    """(registry, model name, version or alias) -> the predictor."""
    examples: Callable[[str, str, ModelVersion, ModelRegistry], list[str]]
    """(base URL, model name, version, registry) -> curl lines for a person to try."""


def _post(url: str, body: str) -> str:
    return f"curl -X POST {url} -H 'content-type: application/json' -d '{body}'"


def _xgboost_examples(url: str, name: str, version: ModelVersion, registry) -> list[str]:
    meta = json.loads(registry.read_file(version, "model.json"))
    row = json.dumps({"rows": [{feature: 0 for feature in meta["feature_names"]}]})
    return [_post(f"{url}/xgboost/{name}/predict", row)]


IMAGE_BODY = '{"images": ["\'"$(base64 -w0 IMAGE.png)"\'"]}'

KINDS: dict[str, ServedKind] = {
    "dqn": ServedKind(
        DQNPolicy,
        lambda url, name, version, registry: [
            _post(f"{url}/dqn/{name}/act", '{"observations": [0.01, 0.02, 0.03, 0.04]}')
        ],
    ),
    "recommender": ServedKind(
        RecommenderService,
        lambda url, name, version, registry: [
            f"curl '{url}/recommend/1?k=10&model={name}'",
            _post(f"'{url}/recommend?model={name}'", '{"ratings": {"1": 5, "50": 4}, "k": 10}'),
            f"curl '{url}/items/1/similar?k=10&model={name}'",
        ],
    ),
    "xgboost": ServedKind(BoostedService, _xgboost_examples),
    "image_classifier": ServedKind(
        ImageClassifierService,
        lambda url, name, version, registry: [_post(f"{url}/vision/{name}/classify", IMAGE_BODY)],
    ),
    "segmenter": ServedKind(
        SegmenterService,
        lambda url, name, version, registry: [_post(f"{url}/vision/{name}/segment", IMAGE_BODY)],
    ),
}
"""Every kind of registered model that is served: the one list the Serve app and the
`rayline serve` command both read."""
