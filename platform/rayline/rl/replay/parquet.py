"""A replay shard as a Parquet file (a background snapshot, or the replay a checkpoint
keeps): written atomically (a temp file, then a rename), so a file is always whole."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayline.fs import atomic_write, filesystem


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    atomic_write(fs, path, lambda out: pq.write_table(table, out))


def fixed_list_column(table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    values = table.column(name).combine_chunks().flatten().to_numpy()
    return values.reshape(-1, *shape)
