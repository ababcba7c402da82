"""What the recommender family serves (rayline.family.SERVING): light to import; its
model classes (torch, SciPy) are imported when a replica loads a model."""

from __future__ import annotations

from rayline.serving.base import ServedKind, post_example
from rayline.store import ModelRegistry


def load(registry: ModelRegistry, name: str, ref):
    from rayline.recsys.predictor import RecommenderService

    return RecommenderService(registry, name, ref)


def _overlap(method: str, a: dict | list, b: dict | list) -> dict[str, float]:
    """The share of the serving answer's top-k items that the other's top-k holds too
    (the mean over users for a batch, `recommend_many`)."""
    if isinstance(a, list):
        shares = [_overlap(method, x, y)["agreement"] for x, y in zip(a, b)]
        return {"agreement": sum(shares) / len(shares) if shares else 1.0}
    ours = [item["item_id"] for item in a["items"]]
    theirs = {item["item_id"] for item in b["items"]}
    return {"agreement": sum(i in theirs for i in ours) / len(ours) if ours else 1.0}


def routes():
    from rayline.recsys.routes import router

    return router()


def protocol():
    from rayline.recsys.routes import protocol

    return protocol()


def exports():
    from rayline.recsys.export import parquet_tables

    return {"parquet": parquet_tables}


SERVED = {
    "recommender": ServedKind(
        "recommender",
        load,
        routes,
        lambda url, name, version, registry: [
            f"curl '{url}/recommend/1?k=10&model={name}'",
            post_example(
                f"'{url}/recommend?model={name}'", '{"ratings": {"1": 5, "50": 4}, "k": 10}'
            ),
            f"curl '{url}/items/1/similar?k=10&model={name}'",
        ],
        _overlap,
        protocol,
        exports,
    )
}
