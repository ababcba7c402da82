"""Tabular data for boosting: Parquet or CSV through pyarrow (local or URI), checked and
turned into float32 feature matrices that XGBoost reads directly.

Every problem is a `DataError` naming the file and the column: a missing label, a
non-numeric feature, an infinity, labels that are not 0..K-1 for a classifier.
Missing values (nulls, NaN) are allowed: XGBoost learns which way they go.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayline.config import DataError
from rayline.fs import atomic_write, filesystem

Kind = Literal["binary", "multiclass", "regression"]


@dataclasses.dataclass(frozen=True)
class Task:
    """What is learned: the XGBoost objective and the metrics that judge it."""

    kind: Kind
    objective: str
    num_class: int = 0
    """Classes of a multiclass task (0 otherwise)."""

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """XGBoost's names; the first is the loss trials are ranked by."""
        return {
            "binary": ("logloss", "error", "auc"),
            "multiclass": ("mlogloss", "merror"),
            "regression": ("rmse", "mae"),
        }[self.kind]


@dataclasses.dataclass
class Table:
    """Features and label, ready for `xgboost.DMatrix`."""

    features: np.ndarray
    """float32 [rows, features]; NaN is missing; categories as integer codes."""
    label: np.ndarray
    """float32 [rows]."""
    feature_names: list[str]
    feature_types: list[str]
    """XGBoost's: "q" numeric, "c" categorical."""
    categories: dict[str, list[str]]
    """Categorical feature -> its categories; code i is categories[i]."""

    def __len__(self) -> int:
        return len(self.label)

    def subset(self, rows: np.ndarray) -> Table:
        return dataclasses.replace(self, features=self.features[rows], label=self.label[rows])

    def dmatrix(self, nthread: int = 1):
        import xgboost as xgb

        return xgb.DMatrix(
            self.features,
            label=self.label,
            feature_names=self.feature_names,
            feature_types=self.feature_types,
            enable_categorical=bool(self.categories),
            nthread=nthread,
        )


def read_table(uri: str) -> pa.Table:
    """A .parquet or .csv file (or a directory of Parquet files), local or URI."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    try:
        if info.type == pafs.FileType.Directory or path.endswith((".parquet", ".pq")):
            table = pq.read_table(path, filesystem=fs)
        elif path.endswith((".csv", ".csv.gz")):
            with fs.open_input_stream(path, compression="detect") as stream:
                # An empty text cell is a missing value, as it is in a numeric column.
                options = pacsv.ConvertOptions(strings_can_be_null=True)
                table = pacsv.read_csv(stream, convert_options=options)
        else:
            raise DataError(f"{uri}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{uri}: cannot be read: {exc}".replace("\n", " ")) from None
    if table.num_rows == 0:
        raise DataError(f"{uri}: the file has no rows")
    return table


def read_label(uri: str, label: str, features: list[str] | None) -> np.ndarray:
    """For data too large to load: check a Parquet file's or directory's schema (label
    present, features present and numeric) and read the label column alone."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
        schema = dataset.schema
        if label not in schema.names:
            raise DataError(
                f"{uri}: no label column {label!r} (columns: {', '.join(schema.names)})"
            )
        for name in features or [n for n in schema.names if n != label]:
            if name not in schema.names:
                raise DataError(f"{uri}: no feature column {name!r}")
            kind = schema.field(name).type
            if not (
                pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            ):
                raise DataError(
                    f"{uri}: feature {name!r} is not numeric ({kind}); data-parallel "
                    "training takes numeric features only"
                )
        column = dataset.read([label]).column(label)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{uri}: cannot be read as Parquet: {exc}".replace("\n", " ")) from None
    if len(column) == 0:
        raise DataError(f"{uri}: the data has no rows")
    return _label(column, uri, label)


def to_table(
    table: pa.Table,
    *,
    label: str,
    features: list[str] | None = None,
    categorical: Literal["auto", "reject"] = "auto",
    categories: dict[str, list[str]] | None = None,
    source: str = "data",
) -> Table:
    """Check `table` and convert it. `features` defaults to every column but the label;
    string columns become categorical features unless `categorical` is "reject".
    `categories` fixes the codes (a validation file must use the training file's)."""
    if label not in table.column_names:
        raise DataError(
            f"{source}: no label column {label!r} (columns: {', '.join(table.column_names)})"
        )
    names = list(features) if features else [c for c in table.column_names if c != label]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: no feature column {missing[0]!r}")
    if label in names:
        raise DataError(f"{source}: the label column {label!r} is also listed as a feature")
    if not names:
        raise DataError(f"{source}: no feature columns besides the label {label!r}")
    known = categories or {}
    columns, types, found = [], [], {}
    for name in names:
        column = table.column(name)
        if _is_text(column.type):
            if categorical == "reject":
                raise DataError(
                    f"{source}: feature {name!r} is not numeric ({column.type}); "
                    "set data.categorical: auto to treat text columns as categories"
                )
            values, found[name] = _category_codes(column, known.get(name), source, name)
            types.append("c")
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values = _numeric(column, source, name)
            types.append("q")
        elif pa.types.is_boolean(column.type):
            values = _numeric(column.cast(pa.int8()), source, name)
            types.append("q")
        else:
            raise DataError(f"{source}: feature {name!r} is not numeric ({column.type})")
        columns.append(values)
    return Table(
        np.stack(columns, axis=1),
        _label(table.column(label), source, label),
        names,
        types,
        found,
    )


def _is_text(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)
    )


def _numeric(column: pa.ChunkedArray, source: str, name: str) -> np.ndarray:
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    values = np.where(pc.is_null(column).to_numpy(zero_copy_only=False), np.nan, values)
    if np.isinf(values).any():
        row = int(np.flatnonzero(np.isinf(values))[0])
        raise DataError(f"{source}: feature {name!r} holds an infinity (row {row})")
    if np.nanmax(np.abs(values), initial=0.0) > np.finfo(np.float32).max:
        raise DataError(f"{source}: feature {name!r} holds values too large for float32")
    return values.astype(np.float32)


def _category_codes(
    column: pa.ChunkedArray, categories: list[str] | None, source: str, name: str
) -> tuple[np.ndarray, list[str]]:
    text = column.cast(pa.string())
    if categories is None:
        categories = sorted(v for v in pc.unique(text).to_pylist() if v is not None)
    codes = pc.index_in(text, value_set=pa.array(categories, pa.string()))
    unseen = pc.and_(pc.is_null(codes), pc.is_valid(text))
    if pc.any(unseen).as_py():
        value = pc.filter(text, unseen)[0].as_py()
        raise DataError(f"{source}: feature {name!r} has category {value!r} not seen in training")
    return codes.cast(pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32), categories


def _label(column: pa.ChunkedArray, source: str, name: str) -> np.ndarray:
    if column.null_count:
        raise DataError(f"{source}: label column {name!r} has {column.null_count} missing values")
    if pa.types.is_boolean(column.type):
        column = column.cast(pa.int8())
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise DataError(
            f"{source}: label column {name!r} is not numeric ({column.type}); "
            "classification labels must be integers 0..K-1"
        )
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if not np.isfinite(values).all():
        raise DataError(f"{source}: label column {name!r} holds NaN or infinity")
    # Integer columns are classes, float columns are targets (see infer_task); keep which.
    return values.astype(np.int64) if pa.types.is_integer(column.type) else values


def infer_task(label: np.ndarray, objective: str = "auto", source: str = "data") -> Task:
    """The task from the label (integers: classes; floats: regression) or the objective.
    Classification labels must be 0..K-1, every class present."""
    if objective == "auto":
        objective = "reg:squarederror"
        if np.issubdtype(label.dtype, np.integer):
            objective = "binary:logistic" if label.max(initial=0) <= 1 else "multi:softprob"
    if objective.startswith("reg:"):
        return Task("regression", objective)
    classes = np.unique(label)
    if not np.array_equal(classes, np.arange(len(classes))):
        shown = ", ".join(str(c) for c in classes[:6]) + (", ..." if len(classes) > 6 else "")
        raise DataError(f"{source}: classification labels must be the integers 0..K-1, got {shown}")
    if objective == "binary:logistic":
        if len(classes) != 2:
            raise DataError(
                f"{source}: binary:logistic needs labels 0 and 1, got {len(classes)} classes"
            )
        return Task("binary", objective)
    if len(classes) < 3:
        raise DataError(f"{source}: {objective} needs at least 3 classes, got {len(classes)}")
    return Task("multiclass", objective, num_class=len(classes))


def split(table: Table, valid_fraction: float, seed: int) -> tuple[Table, Table]:
    """A seeded random train/validation split."""
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    rows = np.random.default_rng(seed).permutation(len(table))
    n_valid = max(1, round(len(table) * valid_fraction))
    if n_valid >= len(table):
        raise DataError(f"data: {len(table)} rows are too few to split off a validation set")
    return table.subset(np.sort(rows[n_valid:])), table.subset(np.sort(rows[:n_valid]))


SKLEARN_SETS = ("breast_cancer", "wine", "digits", "diabetes")


def export_sklearn(name: str, directory: str) -> str:
    """Write one of scikit-learn's bundled data sets as `DIRECTORY/NAME.parquet`, with
    its feature columns and a `target` column. Bundled means offline: no download."""
    if name not in SKLEARN_SETS:
        raise DataError(f"unknown data set {name!r} (expected one of {', '.join(SKLEARN_SETS)})")
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    columns = {n: pa.array(bunch.data[:, i]) for i, n in enumerate(names)}
    target = bunch.target
    columns["target"] = pa.array(target.astype(np.int64) if name != "diabetes" else target)
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, f"{name}.parquet"))
    atomic_write(pafs.LocalFileSystem(), path, lambda out: pq.write_table(pa.table(columns), out))
    return path
