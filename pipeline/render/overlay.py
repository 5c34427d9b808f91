"""Heatmap overlays and the side-by-side pair PNG that a person audits.

Pure functions: arrays in, arrays or PNG bytes out. No file system access; callers
write the bytes wherever they belong.

Rendering is on the job's hot path (one PNG per rendered pair), so the blend runs in
16-bit integers through 256-entry tables and the PNG is written here rather than by
Pillow, whose encoder tries all five PNG filters on every row at any compression level.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.localisation import has_positive_evidence, upsample
from pipeline.schema import TOP_CHANNELS

COLORMAP = "turbo"
"""Matplotlib colormap used for saliency: vivid at the top, so hot spots stand out on photos."""

Box = Sequence[float]  # (x0, y0, x1, y1) in the pixels of the picture it is drawn on
Point = Sequence[float]  # (x, y) in an image's pixel coordinates
Match = tuple[Point, Point]  # a query point and its reference point
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

_MAX_PANEL_ASPECT = 4.0  # a panel is at most this many times wider than tall
_MIN_WIDTH = 480  # narrow pairs are centred on a canvas this wide, so the caption fits
_MAX_TITLE_CHARS = 200
_OVERLAY_ALPHA = 0.6

_PAD = 12
_GAP = 12
_LABEL_SIZE = 18
_CAPTION_SIZE = 20
_SMALL_SIZE = 16
_LABEL_STRIP = _LABEL_SIZE + 14
_CAPTION_STRIP = 3 * (_CAPTION_SIZE + 8) + 2 * _PAD
_COLORBAR_W, _COLORBAR_H = 140, 12

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_BOX_INNER = (0, 255, 255)
_BOX_OUTER = (0, 0, 0)
_MATCH_INNER = (255, 0, 255)
_MATCH_OUTER = (255, 255, 255)
_MAX_MATCHES = 5

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2
_ZLIB_LEVEL = 1


@functools.lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """The (256, 3) uint8 lookup table of `COLORMAP` (matplotlib is imported on first use)."""
    from matplotlib import colormaps

    rgba = colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _blend_tables(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For each colour-map level v / 255: the photo's weight and the weighted colour, in 1/256 units.

    The overlay's weight is `alpha * sqrt(v)`; the two tables sum to 256 x a pixel's blend.
    """
    weight = np.round(256 * alpha * np.sqrt(np.linspace(0.0, 1.0, 256))).astype(np.uint16)
    return 256 - weight, _lut().astype(np.uint16) * weight[:, None]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return image


def _normalised(saliency: np.ndarray) -> np.ndarray | None:
    """ReLU then min-max to [0, 1]; None when nothing is left to show."""
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"expected a 2-D saliency map, got shape {s.shape}")
    if s.size == 0:
        return None
    s = np.maximum(np.where(np.isfinite(s), s, 0.0), 0.0)
    lo, hi = float(s.min()), float(s.max())
    if not hi - lo > 1e-12 * max(1.0, hi):
        return None
    return (s - lo) / (hi - lo)


def heatmap_overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped saliency map onto `image`.

    `saliency` (h, w) is at feature resolution and may have any sign: it is ReLU'd,
    min-max normalised, upsampled bilinearly to the image size and quantised to 256
    levels. Each pixel takes its level's colour with opacity `alpha * sqrt(level)` over the
    photo in grey: mid-strength evidence stays visible, cold regions show the photo, and the
    photo's own colours (a red object where the map is cold) are never read as evidence.
    A constant, empty or all-negative map leaves the image unchanged, in colour.
    """
    image = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    values = _normalised(saliency)
    if values is None:
        return image.copy()
    height, width = image.shape[:2]
    level = np.rint(np.clip(upsample(values, width, height), 0.0, 1.0) * 255).astype(np.uint8)
    keep, paint = _blend_tables(alpha)
    blended = _grey(image)[..., None] * keep[level][..., None] + paint[level] + 128
    return (blended >> 8).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W) uint16 luma of an (H, W, 3) uint8 image (Pillow's ITU-R 601-2 weights)."""
    return np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint16)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _panel_size(shape: tuple[int, ...], panel_height: int) -> tuple[int, int]:
    """(width, height) of the scaled image: panel height, own aspect ratio, width capped."""
    height, width = shape[:2]
    scale = min(panel_height / height, _MAX_PANEL_ASPECT * panel_height / width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _panel(image: np.ndarray, saliency: np.ndarray, box: Box | None, size: tuple[int, int]) -> Image.Image:
    """The image scaled to `size`, with its heatmap and optional box outline."""
    scaled = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    panel = Image.fromarray(heatmap_overlay(np.asarray(scaled), saliency, alpha=_OVERLAY_ALPHA))
    if box is not None:
        sx, sy = size[0] / image.shape[1], size[1] / image.shape[0]
        x0, y0, x1, y1 = (float(c) for c in box)
        rect = [min(x0, x1) * sx, min(y0, y1) * sy, max(x0, x1) * sx, max(y0, y1) * sy]
        draw = ImageDraw.Draw(panel)
        draw.rectangle([rect[0] - 1, rect[1] - 1, rect[2] + 1, rect[3] + 1], outline=_BOX_OUTER, width=4)
        draw.rectangle(rect, outline=_BOX_INNER, width=2)
    return panel


def _draw_matches(draw: ImageDraw.ImageDraw, matches: Sequence[Match], *placed: tuple[float, float, float, float]) -> None:
    """Lines from query points to reference points, each end marked; `placed` maps each image to the canvas."""
    for match in matches[:_MAX_MATCHES]:
        ends = [(px + float(point[0]) * sx, py + float(point[1]) * sy) for point, (px, py, sx, sy) in zip(match, placed)]
        draw.line(ends, fill=_MATCH_OUTER, width=4)
        draw.line(ends, fill=_MATCH_INNER, width=2)
        for ex, ey in ends:
            draw.ellipse([ex - 4, ey - 4, ex + 4, ey + 4], fill=_MATCH_INNER, outline=_MATCH_OUTER)


def _fit(text: str, font: Font, width: float) -> str:
    """`text` on one line, shortened with an ellipsis to at most `width` pixels."""
    text = " ".join(text.split())[:_MAX_TITLE_CHARS]
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _colorbar(draw: ImageDraw.ImageDraw, canvas: Image.Image, right: int, top: int) -> None:
    """A 'low -> high' legend of the colormap whose right edge is at `right`."""
    font = _font(_SMALL_SIZE)
    high_w = font.getlength("high")
    x_bar = round(right - high_w - 6 - _COLORBAR_W)
    ramp = np.repeat(_lut()[np.linspace(0, 255, _COLORBAR_W).astype(int)][None], _COLORBAR_H, axis=0)
    canvas.paste(Image.fromarray(ramp), (x_bar, top + 3))
    draw.rectangle([x_bar - 1, top + 2, x_bar + _COLORBAR_W, top + 3 + _COLORBAR_H], outline=_MUTED)
    draw.text((x_bar - 6, top), "low", font=font, fill=_MUTED, anchor="ra")
    draw.text((right, top), "high", font=font, fill=_MUTED, anchor="ra")


def render_pair_png(
    query: np.ndarray,
    reference: np.ndarray,
    map_query: np.ndarray,
    map_reference: np.ndarray,
    *,
    similarity: float,
    metric: str,
    title: str | None = None,
    top_channels: Sequence[int] | np.ndarray | None = None,
    query_box: Box | None = None,
    reference_box: Box | None = None,
    panel_height: int = 256,
    correspondences: Sequence[Match] | None = None,
) -> bytes:
    """PNG of the query and reference side by side, each with its SFAM overlay.

    Both panels share `panel_height` at their own aspect ratio (panels wider than
    4:1 are letterboxed). Labels sit above the panels; below them a caption gives
    the similarity, the `title` (untrusted: only drawn, shortened to fit) and the
    top channels, with a colour bar legend. The image is `panel_height` plus fixed
    label and caption strips tall. A panel whose map has no positive evidence says so in its label.
    `correspondences`, (query point, reference point) pairs in
    the two images' pixels, strongest first, are drawn as lines between the panels (the first 5).
    """
    query, reference = _check_image(query), _check_image(reference)
    if panel_height < 16:
        raise ValueError(f"panel_height must be at least 16, got {panel_height}")
    label_font = _font(_LABEL_SIZE)
    panels = [(image, saliency, box, label if has_positive_evidence(saliency) else f"{label}: no positive evidence")
              for image, saliency, box, label in ((query, map_query, query_box, "query"),
                                                  (reference, map_reference, reference_box, "reference"))]
    sizes = [_panel_size(image.shape, panel_height) for image, *_ in panels]
    # each panel's slot is at least as wide as its label: a very tall image's panel is centred under it
    slots = [max(size[0], math.ceil(label_font.getlength(label))) for size, (*_, label) in zip(sizes, panels)]
    panels_w = slots[0] + _GAP + slots[1]
    width = max(panels_w, _MIN_WIDTH) + 2 * _PAD
    height = _LABEL_STRIP + panel_height + _CAPTION_STRIP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    x = (width - panels_w) // 2
    placed = []  # (x, y, x scale, y scale) of each panel: image pixels -> canvas pixels
    for (image, saliency, box, label), size, slot in zip(panels, sizes, slots):
        panel_x, y = x + (slot - size[0]) // 2, _LABEL_STRIP + (panel_height - size[1]) // 2
        canvas.paste(_panel(image, saliency, box, size), (panel_x, y))
        draw.text((x, _LABEL_STRIP - 6), label, font=label_font, fill=_TEXT, anchor="ld")
        placed.append((panel_x, y, size[0] / image.shape[1], size[1] / image.shape[0]))
        x += slot + _GAP
    _draw_matches(draw, correspondences or [], *placed)

    caption_font, small_font = _font(_CAPTION_SIZE), _font(_SMALL_SIZE)
    text_w = width - 2 * _PAD
    y = _LABEL_STRIP + panel_height + _PAD
    line_h = _CAPTION_SIZE + 8
    headline = _fit(f"{metric} similarity {similarity:.3f}", caption_font, text_w - _COLORBAR_W - 90)
    draw.text((_PAD, y), headline, font=caption_font, fill=_TEXT)
    _colorbar(draw, canvas, width - _PAD, y + 4)
    if title:
        draw.text((_PAD, y + line_h), _fit(title, small_font, text_w), font=small_font, fill=_TEXT)
    channels = [] if top_channels is None else [int(c) for c in top_channels]
    if channels:
        shown = ", ".join(map(str, channels[:TOP_CHANNELS])) + ("…" if len(channels) > TOP_CHANNELS else "")
        line = _fit(f"top channels: {shown}", small_font, text_w)
        draw.text((_PAD, y + 2 * line_h), line, font=small_font, fill=_MUTED)

    return encode_png(np.asarray(canvas))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(rgb: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG of `rgb`, fast: the "Up" filter on every row, zlib level 1, RLE strategy.

    About 3x faster than Pillow's encoder at its fastest level, for about the size of
    Pillow's default level on photographs.
    """
    rgb = _check_image(rgb)
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, 3 * width)
    filtered = np.empty((height, 1 + 3 * width), np.uint8)
    filtered[:, 0] = _PNG_FILTER_UP
    filtered[0, 1:] = rows[0]  # "Up" from the row above the image, which is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    compressor = zlib.compressobj(_ZLIB_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    idat = compressor.compress(filtered) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filters, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
