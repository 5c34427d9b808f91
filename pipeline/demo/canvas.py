"""Cluttered digit canvases: the built-in demo's synthetic retrieval data.

Source digits are scikit-learn's bundled 8x8 handwritten digits (1797 images,
values 0-16, no download). They are split once by a fixed rule, index % 5 == 0 ->
"test", else "train", so that the demo model never trains on the digits that the
demo and the benchmarks show it.

A canvas is a noisy dark colour gradient with 2-4 distractors (fragments of digits of
other classes and short lines) and one or two upscaled, coloured, slightly rotated
digits on top of them. Ink is always lighter than the background, so digits always
contrast (one polarity only: both polarities made the demo model several times slower
to train); distractors use the same colours as digits, so colour alone does not tell
digit from clutter. Everything is drawn from the given numpy Generator only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits

SPLITS = ("train", "test")
SINGLE_SCALE = (0.35, 0.55)  # digit cell side / canvas side, one digit
PAIR_SCALE = (0.33, 0.42)  # two digits: small enough to always fit side by side
MAX_ROTATION_DEG = 10.0
ALPHA_THRESHOLD = 0.15  # glyph coverage below this is not part of the digit
MAX_COVER = 0.10  # max fraction of a distractor's ink that may fall in a digit box
_GAP = 2  # px between the two digits' boxes
BACKGROUND_MAX = 110.0  # background channels in [0, 110], ink channels in [150, 255]
INK_MIN = 150.0

Box = tuple[float, float, float, float]
Layer = tuple[np.ndarray, int, int]  # coverage (h, w) in [0, 1], top-left x, y on the canvas


@dataclass
class Canvas:
    """A rendered canvas. `boxes[i]` and `masks[i]` locate the digit of class `labels[i]`."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    labels: list[int]
    boxes: list[Box]  # (x0, y0, x1, y1) px, tight around the visible strokes
    masks: list[np.ndarray]  # (S, S) bool, the visible strokes


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Coverage in [0, 1] of every digit with a 2 px zero border (1797, 12, 12), and classes (1797,)."""
    data = load_digits()
    return np.pad(data.images / 16.0, ((0, 0), (2, 2), (2, 2))), data.target.astype(np.int64)


def digit_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of the split's digits: index % 5 == 0 is "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    index = np.arange(len(_digits()[1]))
    return index[index % 5 == 0] if split == "test" else index[index % 5 != 0]


@functools.lru_cache(maxsize=2)
def _pools(split: str) -> tuple[np.ndarray, ...]:
    indices = digit_indices(split)
    targets = _digits()[1][indices]
    return tuple(indices[targets == c] for c in range(10))


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (S, S) float64."""
    return tuple(np.mgrid[0:size, 0:size].astype(np.float64) + 0.5)


def _glyph(digit: np.ndarray, side: float, angle: float) -> np.ndarray:
    """Coverage (h, w) in [0, 1] of a digit (12, 12: 8x8 with a 2 px zero border) scaled to
    a cell of `side` px, rotated by `angle` degrees (bilinear) and cropped to its strokes."""
    k = side / 8.0  # output px per source px
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    n = int(np.ceil(10 * k * (abs(cos) + abs(sin))))  # the 8x8 cell plus 1 px of fade-out, rotated
    ys, xs = _grid(n)
    dx, dy = xs - n / 2, ys - n / 2
    # coords in `digit` (pixel centres at integers); clamped ones land in the zero border
    u = np.clip((cos * dx - sin * dy) / k + 5.5, 0.0, 10.999)
    v = np.clip((sin * dx + cos * dy) / k + 5.5, 0.0, 10.999)
    u0, v0 = u.astype(int), v.astype(int)
    fu, fv = u - u0, v - v0
    alpha = (
        digit[v0, u0] * (1 - fu) * (1 - fv)
        + digit[v0, u0 + 1] * fu * (1 - fv)
        + digit[v0 + 1, u0] * (1 - fu) * fv
        + digit[v0 + 1, u0 + 1] * fu * fv
    ).astype(np.float32)
    alpha[alpha < ALPHA_THRESHOLD] = 0.0
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    return np.minimum(alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 1.0)


def _random_glyph(rng: np.random.Generator, cls: int, split: str, scale: tuple[float, float], size: int) -> np.ndarray:
    index = rng.choice(_pools(split)[cls])
    side = rng.uniform(*scale) * size
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    return _glyph(_digits()[0][index], side, angle)


def _layout(rng: np.random.Generator, shapes: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Top-left corners (x, y) for one or two patches of shape (h, w); two are placed
    side by side or one above the other, >= _GAP px apart, never overlapping."""
    if len(shapes) == 1:
        (h, w) = shapes[0]
        return [(int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)))]
    # axis 0: along x (side by side), 1: along y; extent along axis a is shape[1 - a]
    fits = [a for a in (0, 1) if shapes[0][1 - a] + shapes[1][1 - a] + _GAP <= size]
    axis = fits[int(rng.integers(len(fits)))]  # x always fits at PAIR_SCALE (widths <= 29 px at 64 px)
    first = int(rng.integers(2))  # which patch comes first along the axis
    order = [first, 1 - first]
    along = [shapes[i][1 - axis] for i in order]
    a = int(rng.integers(0, size - along[0] - along[1] - _GAP + 1))
    b = int(rng.integers(a + along[0] + _GAP, size - along[1] + 1))
    corners: list[tuple[int, int]] = [(0, 0), (0, 0)]
    for i, pos in zip(order, (a, b)):
        across = int(rng.integers(0, size - shapes[i][axis] + 1))
        corners[i] = (pos, across) if axis == 0 else (across, pos)
    return corners


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random dark two-colour linear gradient, (S, S, 3) float64 in [0, BACKGROUND_MAX]."""
    c0, c1 = rng.uniform(0.0, BACKGROUND_MAX, (2, 3))
    theta = rng.uniform(0.0, 2 * np.pi)
    ys, xs = _grid(size)
    t = xs * np.cos(theta) + ys * np.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    return c0 + t[..., None] * (c1 - c0)


def _line(rng: np.random.Generator, size: int) -> Layer:
    """Antialiased straight stroke of 25-60 % of the side, clipped to the canvas."""
    length = rng.uniform(0.25, 0.6) * size
    angle = rng.uniform(0.0, np.pi)
    centre = rng.uniform(0.0, size, 2)
    half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    p0, p1 = centre - half, centre + half
    width = rng.uniform(1.0, 2.5)
    lo = [min(max(int(np.floor(min(p0[i], p1[i]) - width)), 0), size) for i in (0, 1)]  # (x, y)
    hi = [min(max(int(np.ceil(max(p0[i], p1[i]) + width)), 0), size) for i in (0, 1)]
    ys, xs = _grid(size)
    ys, xs = ys[lo[1] : hi[1], lo[0] : hi[0]], xs[lo[1] : hi[1], lo[0] : hi[0]]
    d = p1 - p0
    t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
    dist = np.hypot(xs - p0[0] - t * d[0], ys - p0[1] - t * d[1])
    return np.clip(width / 2 + 0.5 - dist, 0.0, 1.0).astype(np.float32), lo[0], lo[1]


def _fragment(rng: np.random.Generator, classes: Sequence[int], split: str, size: int) -> Layer:
    """A random crop (40-70 % per side) of a digit of a class not on the canvas."""
    others = [c for c in range(10) if c not in classes]
    glyph = _random_glyph(rng, int(rng.choice(others)), split, SINGLE_SCALE, size)
    h, w = glyph.shape
    ch, cw = (max(2, round(rng.uniform(0.4, 0.7) * n)) for n in (h, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = glyph[y : y + ch, x : x + cw]
    return crop, int(rng.integers(0, size - cw + 1)), int(rng.integers(0, size - ch + 1))


def _distractors(rng: np.random.Generator, classes: Sequence[int], split: str, size: int, boxes: list[Box]) -> list[Layer]:
    """2-4 distractors, each with <= MAX_COVER of its ink inside a digit box.
    A distractor that finds no such place in 20 tries is dropped."""
    in_boxes = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        in_boxes[int(y0) : int(y1), int(x0) : int(x1)] = True
    out = []
    for _ in range(int(rng.integers(2, 5))):
        is_line = rng.random() < 0.5
        for _ in range(20):
            alpha, x, y = _line(rng, size) if is_line else _fragment(rng, classes, split, size)
            h, w = alpha.shape
            ink = alpha.sum()
            if ink > 0 and alpha[in_boxes[y : y + h, x : x + w]].sum() <= MAX_COVER * ink:
                out.append((alpha, x, y))
                break
    return out


def _composite(image: np.ndarray, layer: Layer, colour: np.ndarray) -> None:
    """Alpha-blend `colour` onto `image` (S, S, 3) in place, through the layer's coverage."""
    alpha, x, y = layer
    h, w = alpha.shape
    region = image[y : y + h, x : x + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * colour


def make_canvas(rng: np.random.Generator, classes: Sequence[int], split: str = "train", size: int = 64) -> Canvas:
    """Draw a canvas with one digit per entry of `classes` (one or two, 0-9, repeats allowed).

    Digits come from `split`'s pool. One digit spans 35-55 % of the side (cell size),
    two digits 33-42 % each, placed with non-overlapping boxes.
    """
    classes = [int(c) for c in classes]
    if not 1 <= len(classes) <= 2 or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"classes must be one or two digits 0-9, got {classes}")
    scale = SINGLE_SCALE if len(classes) == 1 else PAIR_SCALE
    glyphs = [_random_glyph(rng, c, split, scale, size) for c in classes]
    corners = _layout(rng, [g.shape for g in glyphs], size)
    digits: list[Layer] = [(g, x, y) for g, (x, y) in zip(glyphs, corners)]
    boxes: list[Box] = [(float(x), float(y), float(x + g.shape[1]), float(y + g.shape[0])) for g, x, y in digits]

    image = _background(rng, size)
    for layer in _distractors(rng, classes, split, size, boxes) + digits:
        _composite(image, layer, rng.uniform(INK_MIN, 255.0, 3))
    image += rng.normal(0.0, rng.uniform(4.0, 14.0), image.shape)
    masks = []
    for g, x, y in digits:
        mask = np.zeros((size, size), bool)
        mask[y : y + g.shape[0], x : x + g.shape[1]] = g > 0
        masks.append(mask)
    return Canvas(image=np.clip(np.rint(image), 0, 255).astype(np.uint8), labels=classes, boxes=boxes, masks=masks)


def make_dataset(
    rng: np.random.Generator,
    n: int,
    split: str = "train",
    size: int = 64,
    classes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` single-digit canvases; classes uniform at random unless given (length n).

    Returns images (N, S, S, 3) uint8, labels (N,) int64, boxes (N, 4) float32.
    """
    labels = rng.integers(0, 10, n) if classes is None else np.asarray(classes, np.int64)
    if labels.shape != (n,):
        raise ValueError(f"classes must have length {n}, got shape {labels.shape}")
    canvases = [make_canvas(rng, [int(c)], split, size) for c in labels]
    images = np.stack([c.image for c in canvases])
    boxes = np.array([c.boxes[0] for c in canvases], np.float32)
    return images, labels.astype(np.int64), boxes
