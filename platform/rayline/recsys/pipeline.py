"""The recommender pipeline: config, Tune trainable (scored on the protocol's inner
split, never the test part) and registration of the best model refit on all the data."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np

from rayline.config import (
    ConfigError,
    DataError,
    RunConfig,
    SweepConfig,
    bounded,
    from_dict,
    named,
    to_dict,
)
from rayline.drift import PROFILE_FILE
from rayline.family import Pipeline, trial_record
from rayline.fs import fingerprint
from rayline.recsys.als import ALS
from rayline.recsys.base import Recommender
from rayline.recsys.data import Ratings, load_ratings
from rayline.recsys.ease import EASE
from rayline.recsys.evaluate import protocol_splits, ranking_task, rating_task
from rayline.recsys.knn import UserKNN
from rayline.recsys.models import MostPopular
from rayline.recsys.predictor import recommender_profile
from rayline.recsys.served import SERVED
from rayline.store import ModelRegistry, ModelVersion


@dataclasses.dataclass
class DataConfig:
    path: str = ""
    """A MovieLens directory (ratings.csv or u.data), or a .csv/.parquet file; local or URI."""
    user_column: str = "userId"
    """Column of user ids."""
    item_column: str = "movieId"
    """Column of item ids."""
    rating_column: str = "rating"
    """Column of numeric ratings."""


@dataclasses.dataclass
class KNNConfig:
    similarity: Literal["cosine", "pearson"] = "cosine"
    """`pearson` mean-centres each user's ratings first."""
    k: int = bounded(100, ge=1)
    """Neighbours used per prediction and for ranking."""
    shrinkage: float = bounded(0.0, ge=0.0)
    """Damp similarities resting on few co-rated items: sim * n / (n + shrinkage)."""
    min_overlap: int = bounded(1, ge=1)
    """Co-rated items needed for a similarity to count."""
    power: float = bounded(2.0, gt=0.0)
    """Ranking weights neighbours by similarity ** power."""
    workers: int = bounded(0, ge=0)
    """Ray tasks the neighbour search is split into (0 = the trial's own process); the
    neighbours are the same either way."""


@dataclasses.dataclass
class ALSConfig:
    factors: int = bounded(64, ge=1)
    """Latent dimensions."""
    regularization: float = bounded(0.05, ge=0.0)
    """L2 weight (explicit: times each row's count, ALS-WR)."""
    iterations: int = bounded(15, ge=1)
    """Alternations of user and item solves."""
    implicit: bool = False
    """Treat every rating as an interaction with confidence 1 + alpha (for ranking)."""
    alpha: float = bounded(10.0, ge=0.0)
    """Implicit confidence weight."""
    workers: int = bounded(0, ge=0)
    """Ray tasks per half-step (0 = solve in the trial's own process)."""
    cg_steps: int = bounded(3, ge=0)
    """Implicit: conjugate-gradient steps per row per half-step, from the last solution
    (0 = exact solves every time; the last user half-step is always exact)."""


@dataclasses.dataclass
class EASEConfig:
    regularization: float = bounded(500.0, gt=0.0)
    """L2 weight on the item-item matrix (larger for larger, sparser data)."""


@dataclasses.dataclass
class PopularConfig:
    damping: float = bounded(5.0, ge=0.0)
    """Item means are shrunk towards the global mean by this many pseudo-ratings."""


@dataclasses.dataclass
class RecommenderRunConfig(RunConfig):
    name: str = named("recommender")


@dataclasses.dataclass
class RecommenderConfig:
    pipeline: Literal["recommender"] = "recommender"
    """Which pipeline this file configures."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: Literal["user_knn", "als", "ease", "popular"] = "user_knn"
    """Which model to train; its section below holds its hyper-parameters."""
    user_knn: KNNConfig = dataclasses.field(default_factory=KNNConfig)
    als: ALSConfig = dataclasses.field(default_factory=ALSConfig)
    ease: EASEConfig = dataclasses.field(default_factory=EASEConfig)
    popular: PopularConfig = dataclasses.field(default_factory=PopularConfig)
    select_by: Literal["ndcg@10", "rmse"] = "ndcg@10"
    """The validation metric trials are compared by (ranking task B or rating task A)."""
    run: RecommenderRunConfig = dataclasses.field(default_factory=RecommenderRunConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    """Search space for `rayline sweep` over the model's section, e.g. als.factors."""


def build_model(cfg: RecommenderConfig) -> Recommender:
    """The configured model, untrained."""
    if cfg.model == "user_knn":
        return UserKNN(**dataclasses.asdict(cfg.user_knn))
    if cfg.model == "als":
        return ALS(**dataclasses.asdict(cfg.als), seed=cfg.run.seed)
    if cfg.model == "ease":
        return EASE(**dataclasses.asdict(cfg.ease))
    return MostPopular(**dataclasses.asdict(cfg.popular))


def load_data(cfg: RecommenderConfig) -> Ratings:
    d = cfg.data
    if not d.path:
        raise ConfigError("data.path: expected the ratings to train on (a directory or file)")
    return load_ratings(d.path, columns=(d.user_column, d.item_column, d.rating_column))


def validation_metrics(cfg: RecommenderConfig, data: Ratings) -> dict[str, float]:
    """Metrics on the inner split of the training part: what trials are compared by."""
    if cfg.select_by == "rmse":
        from rayline.recsys.data import rating_split

        train, _ = rating_split(data)  # the test rows of task A are never seen
        return {f"valid_{k}": v for k, v in rating_task(lambda: build_model(cfg), train).items()}
    train, valid = protocol_splits(data, inner=True)
    return {
        f"valid_{k}": v for k, v in ranking_task(lambda: build_model(cfg), train, valid).items()
    }


def recommender_trainable(config: dict, data: Ratings | None = None) -> None:
    """Tune function trainable: one model configuration, scored on validation data."""
    from ray import tune

    cfg = from_dict(RecommenderConfig, config)
    tune.report(validation_metrics(cfg, data))


def test_metrics(cfg: RecommenderConfig, data: Ratings) -> dict[str, float]:
    """The protocol's figures on its test parts (for the registry, after selection)."""
    train, test = protocol_splits(data, inner=False)
    ranking = ranking_task(lambda: build_model(cfg), train, test)
    rating = rating_task(lambda: build_model(cfg), data)
    return {
        **{f"test_{k}": v for k, v in ranking.items()},
        "test_rmse": rating["rmse"],
        "test_mae": rating["mae"],
    }


def data_fingerprint(data: Ratings) -> str:
    return fingerprint(
        np.ascontiguousarray(data.users).tobytes(),
        np.ascontiguousarray(data.items).tobytes(),
        np.ascontiguousarray(data.ratings).tobytes(),
        # the raw ids: which user and item each dense index stands for
        np.ascontiguousarray(data.user_ids).tobytes(),
        np.ascontiguousarray(data.item_ids).tobytes(),
    )


def register(cfg: RecommenderConfig, result, registry: ModelRegistry, inputs: dict):
    """The chosen configuration refit on all the data, with its validation figures and
    the protocol's test figures."""
    data = inputs["data"]
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("valid_")}
    metrics.update(test_metrics(cfg, data))
    model = build_model(cfg).fit(data)
    files = model.save()
    files[PROFILE_FILE] = json.dumps(recommender_profile(model)).encode()
    return registry.register(
        cfg.run.name,
        files,
        kind="recommender",
        metrics=metrics,
        config=to_dict(cfg),
        data_fingerprint=data_fingerprint(data),
        run=trial_record(result),
    )


def compare(registry: ModelRegistry, a: ModelVersion, b: ModelVersion, samples: int):
    """Both versions' configurations fitted on the protocol's training part of the ratings
    they were registered on (rebuilt from b's config, checked against both recorded
    fingerprints) and scored on its held-out part: each user's nDCG@10, paired over
    users. (The registered models were refit on all the ratings, held-out part included,
    so they are compared as what they are: a configuration fitted to these ratings.)
    `samples` is unused: every user with held-out items is a sample."""
    from rayline.compare import paired
    from rayline.recsys.evaluate import K, ranked
    from rayline.recsys.metrics import ndcg_per_user

    configs = [from_dict(RecommenderConfig, mv.config) for mv in (a, b)]
    where = f"{a.name} v{b.version}'s ratings"
    try:
        data = load_data(configs[1])
    except (ConfigError, DataError, OSError) as exc:
        raise ConfigError(f"{where} are gone: {exc}") from None
    if data_fingerprint(data) != b.data_fingerprint:
        raise ConfigError(f"{where} ({configs[1].data.path}) have changed since registration")
    if a.data_fingerprint != b.data_fingerprint:
        raise ConfigError(
            f"{a.name} v{a.version} and v{b.version} cannot be compared: "
            "they were trained on different ratings"
        )
    train, test = protocol_splits(data, inner=False)
    scores = []
    for cfg in configs:
        top, relevant = ranked(build_model(cfg).fit(train), train, test)
        scores.append(ndcg_per_user(top, relevant, K))
    return paired(f"test_ndcg@{K}", True, (a.version, scores[0]), (b.version, scores[1]))


def trial_resources(cfg: RecommenderConfig):
    from ray import tune

    workers = {"als": cfg.als.workers, "user_knn": cfg.user_knn.workers}.get(cfg.model, 0)
    return tune.PlacementGroupFactory([{"CPU": 1}] + [{"CPU": 1}] * workers)


def select(cfg: RecommenderConfig) -> tuple[str, str]:
    """Trials are compared by the task `select_by` names."""
    return ("valid_rmse", "min") if cfg.select_by == "rmse" else ("valid_ndcg@10", "max")


PIPELINE = Pipeline(
    "recommender",
    RecommenderConfig,
    recommender_trainable,
    trial_resources,
    "valid_ndcg@10",
    "max",
    register,
    prepare=lambda cfg: {"data": load_data(cfg)},
    select=select,
    serves=SERVED,
    compare=compare,
)
