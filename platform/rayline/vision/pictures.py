"""The pictures registered with a vision model: its learning curves, the best epoch's
confusion matrix (classification) and validation images with true and predicted masks
(segmentation). Drawn with Pillow (torchvision's own image library), as PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
OVERLAY_FILE = "overlay.png"

CURVES_SIZE = (800, 360)
"""Two panels side by side: losses, and the validation score."""
CONFUSION_CELL = 36
CONFUSION_MAX_SIDE = 1800
"""Pixels the confusion matrix's cells take at most, whatever the number of classes."""
OVERLAY_TILE = 160
TRAIN_COLOUR, VALID_COLOUR, BEST_COLOUR = (31, 119, 180), (214, 39, 40), (44, 160, 44)


def palette(n_classes: int) -> np.ndarray:
    """(n_classes + 1, 3) uint8: PASCAL VOC's colour map for classes (background black),
    white last for pixels that are not scored (255 in a mask)."""
    colours = np.zeros((n_classes + 1, 3), dtype=np.uint8)
    for index in range(n_classes):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    colours[n_classes] = (255, 255, 255)
    return colours


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(draw, box, title, series, best_epoch=None) -> None:
    """Lines of (label, colour, [(epoch, value)]) in `box` with axes and a legend."""
    left, top, right, bottom = box
    points = [p for _, _, values in series for p in values if math.isfinite(p[1])]
    draw.text((left, top - 18), title, fill="black")
    draw.rectangle(box, outline="black")
    if not points:
        draw.text((left + 10, top + 10), "no figures", fill="black")
        return
    epochs = [e for e, _ in points]
    values = [v for _, v in points]
    x0, x1 = min(epochs), max(max(epochs), min(epochs) + 1)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def at(epoch, value):
        x = left + 8 + (right - left - 16) * (epoch - x0) / (x1 - x0)
        y = bottom - 8 - (bottom - top - 16) * (value - y0) / (y1 - y0)
        return x, y

    for fraction in (0.0, 0.5, 1.0):  # value ticks
        value = y0 + fraction * (y1 - y0)
        _, y = at(x0, value)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 48, y - 6), f"{value:.3g}", fill="black")
    for epoch in sorted({x0, x1, (x0 + x1) // 2}):  # epoch ticks
        x, _ = at(epoch, y0)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 4, bottom + 6), str(epoch), fill="black")
    if best_epoch is not None and x0 <= best_epoch <= x1:
        x, _ = at(best_epoch, y0)
        draw.line([(x, top + 1), (x, bottom - 1)], fill=BEST_COLOUR)
    for row, (label, colour, values) in enumerate(series):
        line = [at(e, v) for e, v in values if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((right - 110, top + 6 + 14 * row), label, fill=colour)


def curves_png(history: list[dict], score: str) -> bytes:
    """Train and validation loss, and the validation `score`, per epoch; the best epoch
    marked. `history`: one dict per epoch (its reported metrics)."""
    image = Image.new("RGB", CURVES_SIZE, "white")
    draw = ImageDraw.Draw(image)
    width, height = CURVES_SIZE

    def series(key):
        return [(int(h["epoch"]), float(h.get(key, math.nan))) for h in history]

    best = history[-1].get("best_epoch") if history else None
    _panel(
        draw,
        (60, 30, width // 2 - 20, height - 40),
        "loss by epoch",
        [
            ("train", TRAIN_COLOUR, series("train_loss")),
            ("valid", VALID_COLOUR, series("valid_loss")),
        ],
        best,
    )
    _panel(
        draw,
        (width // 2 + 60, 30, width - 20, height - 40),
        f"valid {score} by epoch (green: best)",
        [(f"valid {score}", VALID_COLOUR, series(f"valid_{score}"))],
        best,
    )
    return _png(image)


def confusion_png(confusion: np.ndarray, classes: list[str]) -> bytes:
    """Rows: true class, columns: predicted; each cell's count, shaded by its share of
    the row."""
    n = len(classes)
    margin = 110
    # Cells shrink with many classes (labels and counts dropped when they no longer fit),
    # so a thousand-class model draws a picture, not gigabytes.
    cell = max(1, min(CONFUSION_CELL, CONFUSION_MAX_SIDE // max(n, 1)))
    labelled = cell >= 24
    size = (margin + n * cell + 10, margin + n * cell + 10)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), "predicted ->", fill="black")
    draw.text((8, margin - 20), "true", fill="black")
    totals = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    shares = confusion / totals
    for i in range(n):
        if labelled:
            draw.text((8, margin + i * cell + 12), classes[i][:14], fill="black")
            draw.text((margin + i * cell + 4, margin - 40), classes[i][:4], fill="black")
        for j in range(n):
            shade = int(255 - 200 * shares[i, j])
            box = (
                margin + j * cell,
                margin + i * cell,
                margin + (j + 1) * cell - 1,
                margin + (i + 1) * cell - 1,
            )
            outline = (200, 200, 200) if labelled else None
            draw.rectangle(box, fill=(shade, shade, 255), outline=outline)
            if labelled:
                draw.text((box[0] + 4, box[1] + 12), str(int(confusion[i, j])), fill="black")
    return _png(image)


def overlay_png(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_classes: int) -> bytes:
    """One row per image: the image, the true mask over it, the predicted mask over it
    (class colours at half opacity; white: not scored). Each tile OVERLAY_TILE square."""
    colours = palette(n_classes)
    tile = OVERLAY_TILE
    image = Image.new("RGB", (3 * tile, max(1, len(rows)) * tile), "white")
    for row, (picture, truth, predicted) in enumerate(rows):
        base = Image.fromarray(picture).convert("RGB")
        tiles = [base]
        for mask in (truth, predicted):
            index = np.where(mask == 255, n_classes, np.minimum(mask, n_classes))
            colour = Image.fromarray(colours[index])
            tiles.append(Image.blend(base, colour, 0.5))
        for column, picture_tile in enumerate(tiles):
            resized = picture_tile.resize((tile, tile), Image.Resampling.NEAREST)
            image.paste(resized, (column * tile, row * tile))
    return _png(image)
