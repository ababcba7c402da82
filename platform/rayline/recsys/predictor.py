"""The recommender family's served model, addressed by the data's own user and item ids
(GET /recommend/{user}, POST /recommend, GET /items/{item}/similar)."""

from __future__ import annotations

import math

import numpy as np

from rayline.drift import drift_window, numeric_profile
from rayline.recsys import models as recsys_models
from rayline.recsys.knn import UserKNN
from rayline.serving.base import BadInput, NotFound, registered
from rayline.store import ModelRegistry

EXPLAIN_TOP = 3
"""Neighbours named per recommended item: the most similar who rated it."""
DRIFT_FEATURES = ["user_activity"]
"""What a request is, for drift: log(1 + the items its user rated in training; 0 for a
user the model does not know). Its output: the mean log(1 + raters) of the items it
was given, how popular what the model answers is."""
PROFILE_USERS, PROFILE_K = 500, 10


def item_popularity(model) -> np.ndarray:
    """How many users rated each item in training."""
    return np.asarray((model.seen > 0).sum(axis=0)).ravel().astype(np.float64)


def user_activity(model) -> np.ndarray:
    """How many items each user rated in training."""
    return np.asarray((model.seen > 0).sum(axis=1)).ravel().astype(np.float64)


def recommender_profile(model, seed: int = 0) -> dict:
    """The reference profile stored at registration (rayline.drift): every training
    user's activity, and the popularity of the top-10 given to up to 500 of them."""
    activity = user_activity(model)
    popularity = np.log1p(item_popularity(model))
    users = np.arange(len(activity))
    if len(users) > PROFILE_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, PROFILE_USERS, replace=False))
    answered = []
    for block in np.array_split(users, max(1, len(users) // 100)):  # bounded memory
        tops, scores = model.recommend(block, PROFILE_K)
        answered += [popularity[top[np.isfinite(score)]] for top, score in zip(tops, scores)]
    outputs = np.array([a.mean() if a.size else np.nan for a in answered])
    return {
        "rows": len(activity),
        "features": {DRIFT_FEATURES[0]: numeric_profile(np.log1p(activity))},
        "outputs": numeric_profile(outputs),
    }


class RecommenderService:
    """A registered recommender addressed by the data's own user and item ids."""

    def __init__(self, registry: ModelRegistry, name: str, ref: str | int = "production"):
        self.version = registered(registry, name, ref, "recommender", "a recommender")
        files = registry.read_files(self.version)
        self.model = recsys_models.load(files)
        self.user_index = {str(u): i for i, u in enumerate(self.model.user_ids.tolist())}
        self.item_index = {str(item): i for i, item in enumerate(self.model.item_ids.tolist())}
        self.item_ids = [str(item) for item in self.model.item_ids.tolist()]
        # The cold-start answer: items by how many users rated them.
        self.popularity = item_popularity(self.model)
        self.most_popular = np.argsort(-self.popularity, kind="stable")
        self.log_activity = np.log1p(user_activity(self.model))
        self.log_popularity = np.log1p(self.popularity)
        self.drift = drift_window(files)
        """Who asked and how popular the answers were, against training (rayline.drift)."""

    def _observe(self, log_activity: list[float], answers: list[dict]) -> None:
        if self.drift is None:
            return
        outputs = []
        for answer in answers:
            items = [self.item_index[entry["item_id"]] for entry in answer["items"]]
            outputs.append(self.log_popularity[items].mean() if items else np.nan)
        self.drift.add(np.asarray(log_activity)[:, None], np.asarray(outputs))

    def _items(self, indices: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [
            {"item_id": self.item_ids[i], "score": float(s)}
            for i, s in zip(indices.tolist(), scores.tolist())
            if math.isfinite(s)
        ]

    def tensors(self) -> tuple[list, list]:
        """The Open Inference Protocol's inputs and outputs (rayline.recsys.routes)."""
        from rayline.serving.inference_protocol import TensorSpec

        return [TensorSpec("user_ids", "BYTES", (-1,))], [
            TensorSpec("item_ids", "BYTES", (-1, -1)),
            TensorSpec("scores", "FP32", (-1, -1)),
            TensorSpec("cold_start", "BOOL", (-1,)),
        ]

    def recommend(self, user_id: str, k: int) -> dict:
        """Top-k unseen items for a known user; an unknown user gets the most popular
        items, flagged `cold_start`."""
        return self.recommend_many([(user_id, k)])[0]

    def recommend_many(self, requests: list[tuple[str, int]]) -> list[dict]:
        """`recommend` for many (user_id, k) at once: the known users with the same k are
        scored together, so the item factors are read from memory once per group, not
        once per user (at 27k items that read is most of a request's time)."""
        answers: list[dict | None] = [None] * len(requests)
        groups: dict[int, list[tuple[int, int]]] = {}
        for position, (user_id, k) in enumerate(requests):
            user = self.user_index.get(str(user_id))
            if user is None:
                top = self.most_popular[:k]
                answers[position] = {
                    "user_id": user_id,
                    "cold_start": True,
                    "items": self._items(top, self.popularity[top]),
                }
            else:
                groups.setdefault(k, []).append((position, user))
        for k, members in groups.items():
            users = np.array([user for _, user in members])
            tops, scores = self.model.recommend(users, k)
            for (position, user), top, score in zip(members, tops, scores):
                user_id = requests[position][0]
                answers[position] = {
                    "user_id": user_id,
                    "cold_start": False,
                    "items": self._explained(user, self._items(top, score)),
                }
        activity = [
            float(self.log_activity[self.user_index[str(user_id)]])
            if str(user_id) in self.user_index
            else 0.0
            for user_id, _ in requests
        ]
        self._observe(activity, answers)
        return answers

    def _explained(self, user: int, items: list[dict]) -> list[dict]:
        """User kNN: the neighbours behind each recommended item."""
        if not isinstance(self.model, UserKNN):
            return items
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
        return items

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
        answer = {"items": self._items(top, scores[top]), "unknown_items": unknown}
        self._observe([float(np.log1p(len(known)))], [answer])
        return answer

    def similar(self, item_id: str, k: int) -> dict:
        item = self.item_index.get(str(item_id))
        if item is None:
            raise NotFound(f"item {item_id!r} is not known to model {self.version.name!r}")
        top, sims = self.model.similar_items(item, k)
        return {"item_id": item_id, "items": self._items(top, sims)}
