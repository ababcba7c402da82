"""Ratings data: loaders (MovieLens ratings.csv, u.data, any Parquet/CSV through
pyarrow), dense integer ids with their maps, the evaluation protocol's splits, and a
synthetic latent-factor maker for tests.

Duplicate (user, item) pairs are rejected with an error naming the first one: a
silent choice between two ratings would be a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import scipy.sparse as sp

from rayline.config import DataError
from rayline.fs import atomic_write, filesystem, write_bytes


@dataclasses.dataclass
class Ratings:
    """Ratings with dense ids: user u is `user_ids[u]` in the source data."""

    users: np.ndarray
    """int32 dense user index per rating."""
    items: np.ndarray
    """int32 dense item index per rating."""
    ratings: np.ndarray
    """float32 rating values."""
    user_ids: np.ndarray
    """Original user id of each dense user index."""
    item_ids: np.ndarray
    """Original item id of each dense item index."""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.ratings)

    def subset(self, rows: np.ndarray) -> Ratings:
        """The given rows, keeping the id maps (so indices stay comparable)."""
        return Ratings(
            self.users[rows], self.items[rows], self.ratings[rows], self.user_ids, self.item_ids
        )

    def matrix(self) -> sp.csr_matrix:
        """users x items CSR matrix of the ratings."""
        return sp.csr_matrix(
            (self.ratings.astype(np.float32), (self.users, self.items)),
            shape=(self.n_users, self.n_items),
        )


def read_table(
    uri: str, *, columns: tuple[str, str, str] = ("userId", "movieId", "rating")
) -> pa.Table:
    """Read user, item, rating columns from a MovieLens directory or file: ratings.csv,
    u.data (tab-separated, no header), any .csv/.parquet with the named columns, or a
    directory of Parquet parts. Columnar throughout: no Python loop per row."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    parquet_parts = False
    if info.type == pafs.FileType.Directory:
        for name in ("ratings.csv", "u.data", "ratings.parquet"):
            if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
                path = f"{path}/{name}"
                break
        else:
            listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            parquet_parts = any(f.path.endswith(".parquet") for f in listing)
            if not parquet_parts:
                raise DataError(
                    f"{uri}: no ratings.csv, u.data, ratings.parquet or *.parquet parts "
                    "in this directory"
                )
    elif info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    user_col, item_col, rating_col = columns
    try:
        if parquet_parts or path.endswith(".parquet"):
            # A directory of parts (as Spark or Ray Data write them) is one data set;
            # only the three columns are read.
            dataset = pq.ParquetDataset(path, filesystem=fs)
            table = dataset.read(columns=[c for c in columns if c in dataset.schema.names])
            names = dataset.schema.names
        elif path.endswith("u.data"):
            with fs.open_input_stream(path) as stream:
                table = pacsv.read_csv(
                    stream,
                    read_options=pacsv.ReadOptions(
                        column_names=[user_col, item_col, rating_col, "timestamp"]
                    ),
                    parse_options=pacsv.ParseOptions(delimiter="\t"),
                )
        else:
            with fs.open_input_stream(path) as stream:
                table = pacsv.read_csv(stream)
        if not (parquet_parts or path.endswith(".parquet")):
            names = table.column_names
    except (pa.ArrowInvalid, pa.ArrowIOError) as exc:
        if "Empty CSV file" in str(exc):
            raise DataError(f"{uri}: the file is empty") from None
        raise DataError(f"{uri}: cannot read: {exc}".replace("\n", " ")) from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{uri}: missing column {missing[0]!r} (has {', '.join(names)})")
    if table.num_rows == 0:
        raise DataError(f"{uri}: no ratings")
    if table.column(rating_col).null_count:
        raise DataError(
            f"{uri}: column {rating_col!r} has {table.column(rating_col).null_count} empty values"
        )
    if not pa.types.is_integer(table.schema.field(rating_col).type) and not pa.types.is_floating(
        table.schema.field(rating_col).type
    ):
        raise DataError(
            f"{uri}: column {rating_col!r} is not numeric ({table.schema.field(rating_col).type})"
        )
    return table.select(list(columns)).rename_columns(["user", "item", "rating"])


def load_ratings(
    uri: str, *, columns: tuple[str, str, str] = ("userId", "movieId", "rating")
) -> Ratings:
    """Load ratings with dense ids, rows in file order."""
    table = read_table(uri, columns=columns)
    return from_arrays(
        table.column("user").to_numpy(),
        table.column("item").to_numpy(),
        pc.cast(table.column("rating"), pa.float32()).to_numpy(),
        source=uri,
    )


def from_arrays(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, *, source: str = "ratings"
) -> Ratings:
    """Dense ids for raw user and item ids; rejects non-finite ratings and duplicates."""
    ratings = np.asarray(ratings, dtype=np.float32)
    if not np.all(np.isfinite(ratings)):
        raise DataError(f"{source}: ratings must be finite numbers")
    user_ids, user_index = np.unique(users, return_inverse=True)
    item_ids, item_index = np.unique(items, return_inverse=True)
    pairs = user_index.astype(np.int64) * len(item_ids) + item_index
    unique_pairs, first, counts = np.unique(pairs, return_index=True, return_counts=True)
    if len(unique_pairs) != len(pairs):
        dup = first[np.argmax(counts > 1)]
        raise DataError(
            f"{source}: duplicate rating for user {np.asarray(users)[dup].item()!r}, item {np.asarray(items)[dup].item()!r}"
        )
    # String ids as fixed-width unicode, not Python objects: saved models never need pickle.
    user_ids, item_ids = (
        ids.astype(str) if ids.dtype == object else ids for ids in (user_ids, item_ids)
    )
    return Ratings(
        user_index.astype(np.int32), item_index.astype(np.int32), ratings, user_ids, item_ids
    )


def rating_split(
    data: Ratings, test_fraction: float = 0.2, seed: int = 42
) -> tuple[Ratings, Ratings]:
    """Task A: one random split of rows; the first round(test_fraction * n) of the
    permutation are test."""
    perm = np.random.RandomState(seed).permutation(len(data))
    n_test = int(round(test_fraction * len(data)))
    return data.subset(np.sort(perm[n_test:])), data.subset(np.sort(perm[:n_test]))


def per_user_split(
    data: Ratings, train_fraction: float = 0.75, seed: int = 42
) -> tuple[Ratings, Ratings]:
    """Task B: per user, rows ordered by a seeded random key; the first
    round(train_fraction * n_u) go to train, the rest to test."""
    key = np.random.RandomState(seed).rand(len(data))
    order = np.lexsort((key, data.users))
    users_sorted = data.users[order]
    starts = np.searchsorted(users_sorted, np.arange(data.n_users))
    counts = np.bincount(data.users, minlength=data.n_users)
    rank = np.arange(len(data)) - np.repeat(starts, counts)
    keep = np.round(train_fraction * counts).astype(np.int64)
    in_train = rank < np.repeat(keep, counts)
    return data.subset(np.sort(order[in_train])), data.subset(np.sort(order[~in_train]))


def synthetic_ratings(
    n_users: int = 200,
    n_items: int = 150,
    rank: int = 4,
    density: float = 0.3,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[Ratings, np.ndarray]:
    """Ratings sampled from a known low-rank matrix (biases + U V^T + noise), on the 1..5
    scale. Returns the ratings and the full noiseless matrix."""
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(0, 1 / np.sqrt(rank), (n_users, rank))
    item_factors = rng.normal(0, 1 / np.sqrt(rank), (n_items, rank))
    truth = (
        3.0
        + rng.normal(0, 0.3, (n_users, 1))
        + rng.normal(0, 0.3, (1, n_items))
        + user_factors @ item_factors.T
    )
    mask = rng.random((n_users, n_items)) < density
    users, items = np.nonzero(mask)
    values = truth[users, items] + rng.normal(0, noise, len(users))
    return from_arrays(users, items, values.astype(np.float32), source="synthetic"), truth


def write_example_ratings(
    directory: str, n_users: int = 200, n_items: int = 150, seed: int = 0
) -> str:
    """Write `DIRECTORY/ratings/ratings.csv` in MovieLens's format (userId, movieId,
    rating in half stars 0.5..5, timestamp) from `synthetic_ratings`: a rating set to try
    the recommender on offline, written atomically."""
    data, _ = synthetic_ratings(n_users, n_items, seed=seed)
    stars = np.clip(np.round(data.ratings * 2) / 2, 0.5, 5.0)
    target = os.path.join(directory, "ratings")
    os.makedirs(target, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp"] + [
        f"{user + 1},{item + 1},{rating:.1f},{1_500_000_000 + i}"
        for i, (user, item, rating) in enumerate(zip(data.users, data.items, stars))
    ]
    write_bytes(os.path.join(target, "ratings.csv"), ("\n".join(lines) + "\n").encode())
    return target


def make_ratings(
    directory: str, n_users: int, n_items: int, n_ratings: int, seed: int = 0, rank: int = 8
) -> str:
    """Write `DIRECTORY/ratings.parquet` (userId, movieId, rating in half stars 0.5..5):
    synthetic ratings skewed like a real catalogue's, for benchmarks at any size. Items
    are drawn by a power-law popularity (the k-th most popular item ~ k^-0.9), users by a
    log-normal activity (sigma 1.2); each (user, item) at most once. Ratings come from a
    global mean, user and item biases and a rank-`rank` taste model plus noise, so there
    is something to learn. Seeded; no Python loop per rating; written atomically."""
    if min(n_users, n_items, n_ratings) < 1:
        raise DataError("make-ratings: users, items and ratings must be at least 1")
    if n_ratings > n_users * n_items // 2:
        raise DataError(
            f"make-ratings: {n_ratings:,} ratings is over half of the {n_users:,} x "
            f"{n_items:,} matrix; a skewed sample that dense is not realistic"
        )
    needed = 64 * n_ratings + 16 * (n_users + n_items) * (rank + 2)  # bytes, at the peak
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1 << 40
    if needed > memory // 2:
        raise DataError(
            f"make-ratings: {n_ratings:,} ratings need about {needed / 2**30:,.1f} GiB; "
            f"this machine has {memory / 2**30:,.1f} GiB"
        )
    rng = np.random.default_rng(seed)
    user_weight = rng.lognormal(0.0, 1.2, n_users)
    item_weight = rng.permutation(1.0 / np.arange(1, n_items + 1) ** 0.9)
    keys = np.empty(0, dtype=np.int64)
    for _ in range(60):  # each round draws what is missing, and a margin for repeats
        missing = n_ratings - len(keys)
        if missing <= 0:
            break
        draw = int(missing * 1.3) + 1000
        users = rng.choice(n_users, draw, p=user_weight / user_weight.sum())
        items = rng.choice(n_items, draw, p=item_weight / item_weight.sum())
        keys = np.unique(np.concatenate([keys, users.astype(np.int64) * n_items + items]))
    else:
        raise DataError("make-ratings: too dense for this skew; ask for fewer ratings")
    keys = np.sort(rng.choice(keys, n_ratings, replace=False))
    users, items = keys // n_items, keys % n_items
    user_factors = rng.normal(0, 1 / np.sqrt(rank), (n_users, rank)).astype(np.float32)
    item_factors = rng.normal(0, 1 / np.sqrt(rank), (n_items, rank)).astype(np.float32)
    values = (
        3.5
        + rng.normal(0, 0.4, n_users)[users]
        + rng.normal(0, 0.4, n_items)[items]
        + np.einsum("rk,rk->r", user_factors[users], item_factors[items])
        + rng.normal(0, 0.5, n_ratings)
    )
    stars = np.clip(np.round(values * 2) / 2, 0.5, 5.0).astype(np.float32)
    table = pa.table({"userId": users + 1, "movieId": items + 1, "rating": stars})
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "ratings.parquet")
    fs, path = filesystem(target)
    atomic_write(fs, path, lambda out: pq.write_table(table, out))
    return target
