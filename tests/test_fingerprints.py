"""A data fingerprint names the data, not its name: one pixel, one rating or one row
changed changes it; the same data read again, or copied elsewhere, keeps it."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rayline.boosting.config import XGBoostConfig
from rayline.boosting.distributed import parquet_fingerprint
from rayline.boosting.pipeline import load_data as load_tables
from rayline.boosting.pipeline import table_fingerprint
from rayline.config import from_dict
from rayline.recsys.data import from_arrays
from rayline.recsys.pipeline import data_fingerprint as ratings_fingerprint
from rayline.rl.config import DQNConfig
from rayline.rl.pipeline import env_fingerprint
from rayline.vision import classification, segmentation
from rayline.vision.data import (
    make_shape_scenes,
    make_shapes,
    read_image_folder,
    read_segmentation_folder,
)


def image_fingerprint(folder) -> str:
    return classification.data_fingerprint(*read_image_folder(str(folder), 0.2, 0))


def change_one_pixel(path) -> None:
    image = np.array(Image.open(path))
    image[0, 0] = 255 - image[0, 0]
    Image.fromarray(image).save(path)


def test_image_folder_fingerprint_follows_the_pixels(tmp_path):
    folder = make_shapes(tmp_path / "a", per_class=6, size=16, seed=0)
    before = image_fingerprint(folder)
    assert image_fingerprint(folder) == before
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "shapes")
    assert image_fingerprint(copy) == before  # where the data lies is not the data
    first = sorted((tmp_path / "elsewhere" / "shapes" / "train" / "circle").iterdir())[0]
    change_one_pixel(first)
    assert image_fingerprint(copy) != before


def test_segmentation_fingerprint_follows_the_masks(tmp_path):
    folder = make_shape_scenes(tmp_path, count=12, size=32, seed=0)
    before = segmentation.data_fingerprint(*read_segmentation_folder(str(folder)))
    mask = sorted((tmp_path / "shape-scenes" / "val" / "masks").iterdir())[0]
    values = np.array(Image.open(mask))
    values[0, 0] = 1 if values[0, 0] != 1 else 0
    Image.fromarray(values).save(mask)
    assert segmentation.data_fingerprint(*read_segmentation_folder(str(folder))) != before


def test_ratings_fingerprint_follows_one_rating():
    users, items = np.array([1, 1, 2, 3]), np.array([10, 20, 10, 30])
    ratings = np.array([5.0, 3.0, 4.0, 2.0])
    before = ratings_fingerprint(from_arrays(users, items, ratings))
    assert ratings_fingerprint(from_arrays(users, items, ratings.copy())) == before
    changed = ratings.copy()
    changed[2] = 4.5
    assert ratings_fingerprint(from_arrays(users, items, changed)) != before
    # the same pattern over other item ids is other data
    assert ratings_fingerprint(from_arrays(users, items + 1, ratings)) != before


def write_rows(path, values) -> None:
    pq.write_table(pa.table({"x": values, "target": [i % 2 for i in range(len(values))]}), path)


def test_table_fingerprints_follow_one_row(tmp_path):
    values = [float(i) for i in range(40)]
    write_rows(tmp_path / "data.parquet", values)
    cfg = from_dict(XGBoostConfig, {"data": {"path": str(tmp_path / "data.parquet")}})
    loaded = load_tables(cfg)
    before = table_fingerprint(loaded["train"], loaded["valid"])
    assert table_fingerprint(*(load_tables(cfg)[k] for k in ("train", "valid"))) == before
    values[7] = 70.5
    write_rows(tmp_path / "data.parquet", values)
    changed = load_tables(cfg)
    assert table_fingerprint(changed["train"], changed["valid"]) != before


def test_parquet_directory_fingerprint_follows_one_row_and_not_the_folder_name(tmp_path):
    values = [float(i) for i in range(20)]
    (tmp_path / "a").mkdir()
    write_rows(tmp_path / "a" / "part-0.parquet", values[:10])
    write_rows(tmp_path / "a" / "part-1.parquet", values[10:])

    def fingerprint(folder) -> str:
        return parquet_fingerprint(from_dict(XGBoostConfig, {"data": {"path": str(folder)}}))

    before = fingerprint(tmp_path / "a")
    assert fingerprint(shutil.copytree(tmp_path / "a", tmp_path / "b")) == before
    values[15] = -1.0
    write_rows(tmp_path / "b" / "part-1.parquet", values[10:])
    assert fingerprint(tmp_path / "b") != before


def test_env_fingerprint_names_the_env_and_its_preprocessing():
    def fingerprint(**env) -> str:
        return env_fingerprint(from_dict(DQNConfig, {"env": env}))

    base = fingerprint(id="CartPole-v1")
    assert fingerprint(id="CartPole-v1", num_envs_per_collector=2) == base  # not the data
    assert fingerprint(id="CartPole-v1", max_episode_steps=200) != base
    assert fingerprint(id="Acrobot-v1") != base
