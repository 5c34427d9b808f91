"""Where a map puts its mass, measured against an object's box (localisation statistics).

Maps are at feature resolution (h, w) and cover the whole image (the model sees the image
resized to its input size, without cropping), so a map cell maps linearly to image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = Sequence[float]  # (x0, y0, x1, y1) in image pixels
GRID_SIDE = 128  # maps are upsampled to at most this many cells a side for the statistics


def upsample(saliency: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to (height, width), float32."""
    return np.asarray(Image.fromarray(saliency.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


Scale = tuple[float, float]  # image pixels per grid cell, (x, y)


def _grid(saliency: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, Scale]:
    """The map upsampled to the image's aspect ratio (at most GRID_SIDE cells a side, at least
    one), and the image pixels per cell along x and y."""
    width, height = image_size
    side = max(width, height) / GRID_SIDE
    cols, rows = max(1, round(width / side)), max(1, round(height / side))
    return upsample(saliency, cols, rows), (width / cols, height / rows)


def _box_mask(shape: tuple[int, int], box: Box, scale: Scale) -> np.ndarray:
    rows, cols = shape
    xs, ys = (np.arange(cols) + 0.5) * scale[0], (np.arange(rows) + 0.5) * scale[1]  # cell centres in pixels
    x0, y0, x1, y1 = box
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def box_in_image(box: Box, image_size: tuple[int, int]) -> bool:
    """Whether the box covers any of the image (width, height); one wholly outside it locates nothing."""
    width, height = image_size
    x0, y0, x1, y1 = box
    return x0 < width and y0 < height and x1 > 0 and y1 > 0


def peak_xy(saliency: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float]:
    """Image-pixel (x, y) of the map's maximum, the point the pointing game tests: the centre of
    its largest cell, where the bilinearly upsampled map peaks too. (Not the upsampled map's
    first maximal pixel: by an image's top or left edge that map is flat from the cell's centre
    outwards, and its first pixel lies on the edge, outside a box a cell's width away.)"""
    height, width = saliency.shape
    row, col = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return float((col + 0.5) * image_size[0] / width), float((row + 0.5) * image_size[1] / height)


def energy_in_box(saliency: np.ndarray, box: Box, image_size: tuple[int, int]) -> float:
    """Share of the map's positive mass inside the box; NaN when the map has none."""
    return _energy(*_grid(np.maximum(saliency, 0), image_size), box)


def pointing_hit(saliency: np.ndarray, box: Box, image_size: tuple[int, int]) -> bool:
    """Whether the map's maximum (peak_xy) falls inside the box (the pointing game)."""
    return _inside(peak_xy(saliency, image_size), box)


@dataclass(frozen=True)
class Localisation:
    """peak_xy, and energy_in_box and pointing_hit against a box (None without one), of one map.
    A map without positive evidence (all zero, or nowhere above zero) locates nothing: all None."""

    peak_xy: tuple[float, float] | None = None
    energy_in_box: float | None = None
    pointing_hit: bool | None = None


def has_positive_evidence(saliency: np.ndarray) -> bool:
    """Whether any cell of the map is above zero: a map without is drawn as nothing and locates nothing."""
    return bool((np.asarray(saliency) > 0).any())


def localise(saliency: np.ndarray, image_size: tuple[int, int], box: Box | None = None) -> Localisation:
    """The three statistics above."""
    if not has_positive_evidence(saliency):  # its maximum would be an arbitrary cell, and its energy 0 / 0
        return Localisation()
    peak = peak_xy(saliency, image_size)
    if box is None:
        return Localisation(peak)
    return Localisation(peak, energy_in_box(saliency, box, image_size), _inside(peak, box))


def _energy(positive_grid: np.ndarray, scale: Scale, box: Box) -> float:
    total = float(positive_grid.sum())
    inside = positive_grid[_box_mask(positive_grid.shape, box, scale)]
    return float(inside.sum()) / total if total > 0 else float("nan")


def _inside(point: tuple[float, float], box: Box) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return bool(x0 <= x <= x1 and y0 <= y <= y1)
