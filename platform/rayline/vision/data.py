"""Image classification data: an image folder (one sub-directory per class), local or on
object storage, and a maker of a small labelled data set for demos and tests.

Two layouts are read, as in torchvision's references: `root/train/<class>/*` beside
`root/val/<class>/*`, or `root/<class>/*` split into train and validation with a seed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from rayline.config import DataError
from rayline.fs import file_digests, filesystem


@functools.lru_cache(maxsize=16)
def _filesystem(uri: str) -> pafs.FileSystem:
    """One filesystem per data set and process: opening an S3 or GCS one per image read
    would cost a connection each time."""
    return filesystem(uri)[0]


def _open_image(uri: str, path: str):
    """The image file at `path` on `uri`'s filesystem, decoded (PIL); an unreadable file
    is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _filesystem(uri).open_input_file(path) as stream:
            image = Image.open(io.BytesIO(stream.read()))
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def content_parts(uri: str, paths: tuple[str, ...]) -> list[str]:
    """`relative path=digest of its bytes` per file: what a data fingerprint is made of.
    Paths are taken relative to `uri`, so the same folder copied elsewhere keeps them."""
    fs, root = filesystem(uri)
    prefix = root.rstrip("/") + "/"
    try:
        digests = file_digests(fs, paths)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{uri}: cannot read a file to fingerprint it ({exc})") from None
    return [f"{p.removeprefix(prefix)}={d}" for p, d in zip(paths, digests)]


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
        return _open_image(self.uri, self.paths[index]).convert("RGB")


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


@dataclasses.dataclass(frozen=True)
class SegmentationSet:
    """Images and their masks: each mask pixel is a class index into `classes`, or 255
    for a pixel that is not scored."""

    uri: str
    images: tuple[str, ...]
    masks: tuple[str, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int):
        """(RGB image, mask as an (H, W) uint8 array); a bad file is a DataError naming it."""
        image = _open_image(self.uri, self.images[index])
        mask = _open_image(self.uri, self.masks[index])
        if mask.mode not in ("L", "P"):
            raise DataError(f"{self.masks[index]}: expected a one-channel mask of class indices")
        labels = np.array(mask, dtype=np.uint8)  # a writable copy, as torch wants
        if labels.shape != (image.height, image.width):
            raise DataError(
                f"{self.masks[index]}: mask is {labels.shape[1]}x{labels.shape[0]}, "
                f"its image {image.width}x{image.height}"
            )
        wrong = labels[(labels >= len(self.classes)) & (labels != 255)]
        if wrong.size:
            raise DataError(
                f"{self.masks[index]}: class index {int(wrong[0])} but classes.txt names "
                f"{len(self.classes)} classes (255 marks pixels not scored)"
            )
        return image.convert("RGB"), labels


def read_segmentation_folder(uri: str) -> tuple[SegmentationSet, SegmentationSet]:
    """(train, validation) from `uri`: classes.txt (one class name per line, line i is
    class i) and train/ and val/ folders, each of images/ and masks/ whose files pair up by
    name (a mask is a PNG of class indices)."""
    try:
        fs, root = filesystem(uri)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot be opened ({exc})") from None
    root = root.rstrip("/")
    try:
        with fs.open_input_file(f"{root}/classes.txt") as stream:
            classes = tuple(
                line.strip() for line in stream.read().decode().splitlines() if line.strip()
            )
    except (FileNotFoundError, OSError):
        raise DataError(
            f"{uri}/classes.txt: missing (one class name per line; line 0 is class 0)"
        ) from None
    if len(classes) < 2:
        raise DataError(f"{uri}/classes.txt: expected at least two classes")
    parts = []
    for part in ("train", "val"):
        images = _files_by_stem(fs, f"{root}/{part}/images", f"{uri}/{part}/images")
        masks = _files_by_stem(fs, f"{root}/{part}/masks", f"{uri}/{part}/masks")
        unmatched = sorted(set(images) ^ set(masks))
        if unmatched:
            where = "images" if unmatched[0] in images else "masks"
            raise DataError(
                f"{uri}/{part}/{where}: {unmatched[0]!r} has no partner in the other folder"
            )
        stems = sorted(images)
        parts.append(
            SegmentationSet(
                uri, tuple(images[s] for s in stems), tuple(masks[s] for s in stems), classes
            )
        )
    return parts[0], parts[1]


def _files_by_stem(fs: pafs.FileSystem, directory: str, shown: str) -> dict[str, str]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        raise DataError(f"{shown}: no such directory")
    files = {
        info.base_name.rsplit(".", 1)[0]: info.path
        for info in fs.get_file_info(pafs.FileSelector(directory))
        if info.type == pafs.FileType.File and info.base_name.lower().endswith(IMAGE_SUFFIXES)
    }
    if not files:
        raise DataError(f"{shown}: no images")
    return files


def make_shapes(
    directory: str | os.PathLike, per_class: int = 60, size: int = 64, seed: int = 0
) -> str:
    """Write DIR/shapes: PNG images of a circle, a square or a triangle of random colour,
    size and place on a noisy background, in train/ (80 %) and val/ (20 %) folders.
    Written to a temporary folder and renamed, so a reader never sees half of it."""
    if per_class < 5 or size < 16:
        raise DataError("shapes: expected at least 5 images per class of at least 16 pixels")
    rng = np.random.default_rng(seed)
    staging = _staging(directory)
    held = max(1, per_class // 5)
    for shape in SHAPES:
        for i in range(per_class):
            image, background = _noisy_background(rng, size)
            _draw_shape(image, None, shape, 0, background, rng, size, (0.18, 0.32))
            folder = staging / ("val" if i < held else "train") / shape
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{shape}-{i:04d}.png")
    return _publish(staging, Path(directory, "shapes"))


def make_shape_scenes(
    directory: str | os.PathLike, count: int = 100, size: int = 64, seed: int = 0
) -> str:
    """Write DIR/shape-scenes, a segmentation set: PNG images holding one to three
    circles, squares and triangles, each with a mask PNG whose pixels are the class
    index (0 background, 1 circle, 2 square, 3 triangle), in train/ (80 %) and val/
    (20 %) folders of images/ and masks/, and classes.txt. Written atomically."""
    from PIL import Image

    if count < 5 or size < 32:
        raise DataError("shape-scenes: expected at least 5 images of at least 32 pixels")
    rng = np.random.default_rng(seed)
    staging = _staging(directory)
    held = max(1, count // 5)
    for i in range(count):
        image, background = _noisy_background(rng, size)
        mask = Image.new("L", (size, size), 0)
        for _ in range(rng.integers(1, 4)):
            label = int(rng.integers(1, len(SHAPES) + 1))
            _draw_shape(image, mask, SHAPES[label - 1], label, background, rng, size, (0.14, 0.26))
        part = staging / ("val" if i < held else "train")
        for kind, picture in (("images", image), ("masks", mask)):
            (part / kind).mkdir(parents=True, exist_ok=True)
            picture.save(part / kind / f"{i:04d}.png")
    (staging / "classes.txt").write_text("\n".join(("background", *SHAPES)) + "\n")
    return _publish(staging, Path(directory, "shape-scenes"))


def _noisy_background(rng: np.random.Generator, size: int):
    from PIL import Image

    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8)), background


def _draw_shape(image, mask, shape: str, label: int, background, rng, size, radii) -> None:
    """One shape of a colour far from the background, on `image` and (as `label`) on
    `mask` when there is one."""
    from PIL import ImageDraw

    colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 40, 3)) % 256)
    radius = rng.uniform(*radii) * size
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    turn = rng.uniform(0, 2 * math.pi)
    for canvas, fill in ((image, colour), (mask, label)):
        if canvas is None:
            continue
        draw = ImageDraw.Draw(canvas)
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif shape == "square":
            half = radius * 0.85
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            corners = [
                (
                    cx + radius * math.cos(turn + k * 2 * math.pi / 3),
                    cy + radius * math.sin(turn + k * 2 * math.pi / 3),
                )
                for k in range(3)
            ]
            draw.polygon(corners, fill=fill)


def _staging(directory: str | os.PathLike) -> Path:
    parent = Path(directory)
    parent.mkdir(parents=True, exist_ok=True)
    return parent / f".staging-{uuid.uuid4().hex}"


def _publish(staging: Path, target: Path) -> str:
    """Put a fully written folder in place of `target` by renames."""
    if target.exists():
        retired = target.parent / f".retired-{uuid.uuid4().hex}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
    return str(target)
