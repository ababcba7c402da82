"""Image classification data: an image folder (one sub-directory per class), local or on
object storage, and a maker of a small labelled data set for demos and tests.

Two layouts are read, as in torchvision's references: `root/train/<class>/*` beside
`root/val/<class>/*`, or `root/<class>/*` split into train and validation with a seed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from rayline.config import DataError
from rayline.store import filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Labelled image files: `paths[i]` (on `uri`'s filesystem) shows `classes[labels[i]]`."""

    uri: str
    """The image folder the paths are under (its filesystem is opened from this)."""
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int):
        """Image `index` as an RGB PIL image; an unreadable file is a DataError naming it."""
        from PIL import Image, UnidentifiedImageError

        fs, _ = filesystem(self.uri)
        path = self.paths[index]
        try:
            with fs.open_input_file(path) as stream:
                image = Image.open(io.BytesIO(stream.read()))
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None


def read_image_folder(
    uri: str, valid_fraction: float, split_seed: int
) -> tuple[ImageSet, ImageSet]:
    """(train, validation) from `uri`: its train/ and val/ folders, or a seeded split of its
    class folders. Every class must hold an image in each part."""
    try:
        fs, root = filesystem(uri)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot be opened ({exc})") from None
    root = root.rstrip("/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"{uri}: no such directory (expected one folder of images per class)")
    if all(
        fs.get_file_info(f"{root}/{part}").type == pafs.FileType.Directory
        for part in ("train", "val")
    ):
        train_files = _class_files(fs, f"{root}/train", f"{uri}/train")
        valid_files = _class_files(fs, f"{root}/val", f"{uri}/val")
        if sorted(valid_files) != sorted(train_files):
            raise DataError(
                f"{uri}: train/ and val/ must hold the same class folders "
                f"(train: {sorted(train_files)}, val: {sorted(valid_files)})"
            )
    else:
        train_files, valid_files = _split(
            _class_files(fs, root, uri), valid_fraction, split_seed, uri
        )
    classes = tuple(sorted(train_files))
    return _image_set(uri, classes, train_files), _image_set(uri, classes, valid_files)


def _class_files(fs: pafs.FileSystem, directory: str, shown: str) -> dict[str, list[str]]:
    folders = [
        info
        for info in fs.get_file_info(pafs.FileSelector(directory))
        if info.type == pafs.FileType.Directory and not info.base_name.startswith(".")
    ]
    if len(folders) < 2:
        raise DataError(
            f"{shown}: expected a folder of images per class, found {len(folders)} class folder(s)"
        )
    files = {}
    for folder in folders:
        images = sorted(
            info.path
            for info in fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
            if info.type == pafs.FileType.File and info.base_name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not images:
            raise DataError(
                f"{shown}/{folder.base_name}: no images (expected files ending in "
                f"{', '.join(IMAGE_SUFFIXES)})"
            )
        files[folder.base_name] = images
    return files


def _split(
    files: dict[str, list[str]], valid_fraction: float, seed: int, uri: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per class, a seeded share of the images for validation (at least one each side)."""
    rng = np.random.default_rng(seed)
    train, valid = {}, {}
    for name, paths in sorted(files.items()):
        if len(paths) < 2:
            raise DataError(f"{uri}/{name}: one image cannot be split into train and validation")
        order = rng.permutation(len(paths))
        held = min(max(1, round(len(paths) * valid_fraction)), len(paths) - 1)
        valid[name] = sorted(paths[i] for i in order[:held])
        train[name] = sorted(paths[i] for i in order[held:])
    return train, valid


def _image_set(uri: str, classes: tuple[str, ...], files: dict[str, list[str]]) -> ImageSet:
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += files[name]
        labels += [label] * len(files[name])
    return ImageSet(uri, tuple(paths), tuple(labels), classes)


def make_shapes(
    directory: str | os.PathLike, per_class: int = 60, size: int = 64, seed: int = 0
) -> str:
    """Write DIR/shapes: PNG images of a circle, a square or a triangle of random colour,
    size and place on a noisy background, in train/ (80 %) and val/ (20 %) folders.
    Written to a temporary folder and renamed, so a reader never sees half of it."""
    from PIL import Image, ImageDraw

    if per_class < 5 or size < 16:
        raise DataError("shapes: expected at least 5 images per class of at least 16 pixels")
    rng = np.random.default_rng(seed)
    parent = Path(directory)
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".shapes-{uuid.uuid4().hex}"
    held = max(1, per_class // 5)
    for shape in SHAPES:
        for i in range(per_class):
            part = "val" if i < held else "train"
            background = rng.integers(0, 256, 3)
            noise = rng.normal(0, 12, (size, size, 3))
            pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 40, 3)) % 256)
            radius = rng.uniform(0.18, 0.32) * size
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
            elif shape == "square":
                half = radius * 0.85
                draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
            else:
                turn = rng.uniform(0, 2 * math.pi)
                corners = [
                    (
                        cx + radius * math.cos(turn + k * 2 * math.pi / 3),
                        cy + radius * math.sin(turn + k * 2 * math.pi / 3),
                    )
                    for k in range(3)
                ]
                draw.polygon(corners, fill=colour)
            folder = staging / part / shape
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{shape}-{i:04d}.png")
    target = parent / "shapes"
    if target.exists():
        retired = parent / f".shapes-old-{uuid.uuid4().hex}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
    return str(target)
