"""Recommenders out of rayline: Parquet tables any data tool reads, and a README.md that
says exactly how they score, so that the served top-k can be computed elsewhere
(rayline.export)."""

from __future__ import annotations

import os

import numpy as np

SCORING = {
    "als": """score(u, i) = dot(users.factors[u], items.factors[i]) + items.bias[i]
    {explicit}
Matrix factorisation (alternating least squares), {factors} factors.""",
    "ease": """score(u, i) = sum over the items j that u rated of weights[j][i]
EASE (Steck, 2019): `weights.parquet` holds row j of the item-item matrix as `weights`
(one value per item, in items.parquet's order).""",
    "user_knn": """score(u, i) = sum over u's neighbours v of max(similarity(u, v), 0) ** {power}
                 x rating(v, i)   (0 where v did not rate i)
User-based k nearest neighbours: `neighbors.parquet` lists each user's {k} nearest, most
similar first, with their similarities ({similarity}).""",
    "popular": """score(u, i) = popularity.raters[i]  (the same for everyone)""",
}


def parquet_tables(service, folder: str) -> list[str]:
    """The recommender behind the served predictor as Parquet: `ratings.parquet` (the
    training ratings: what each user is never recommended again), the kind's own tables,
    `popularity.parquet` (the cold-start answer) and README.md, how they score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = service.model
    users = [str(u) for u in model.user_ids.tolist()]
    items = [str(i) for i in model.item_ids.tolist()]
    seen = model.seen.tocoo()
    tables = {
        "ratings": {
            "user_id": [users[u] for u in seen.row.tolist()],
            "item_id": [items[i] for i in seen.col.tolist()],
            "rating": seen.data.astype(np.float32),
        },
        "popularity": {"item_id": items, "raters": service.popularity.astype(np.int64)},
    }
    kind, params, explicit = model.kind, model.params(), ""
    if kind == "als":
        tables["users"] = {
            "user_id": users,
            "bias": model.user_bias,
            "factors": list(model.user_factors),
        }
        tables["items"] = {
            "item_id": items,
            "bias": model.item_bias,
            "factors": list(model.item_factors),
        }
        if not model.implicit:
            explicit = f"+ {model.global_mean!r} + users.bias[u]   (explicit ratings)"
    elif kind == "ease":
        tables["weights"] = {"item_id": items, "weights": list(np.asarray(model.weights))}
    elif kind == "user_knn":
        k = min(model.k, model.neighbors.shape[1])
        tables["neighbors"] = {
            "user_id": users,
            "neighbor_ids": [[users[v] for v in row] for row in model.neighbors[:, :k].tolist()],
            "similarities": list(model.neighbor_sims[:, :k]),
        }
        params = {**params, "k": k}
    written = []
    for name, columns in tables.items():
        pq.write_table(pa.table(columns), os.path.join(folder, f"{name}.parquet"))
        written.append(f"{name}.parquet")
    formula = SCORING[kind].format(**{**params, "explicit": explicit})
    readme = f"""# A rayline {kind} recommender

{formula}

Top-k for a user in `ratings.parquet`: the k items of highest score that the user did not
rate there, ties broken by the lower position in items order. A user not in
`ratings.parquet` gets the cold-start answer: the items by `popularity.raters` (how many
users rated them), most first.

Parameters: {params}
Tables: {", ".join(written)}
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(readme)
    return [*written, "README.md"]
