"""Heatmap overlays and pair PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.render import heatmap_overlay, render_pair_png
from pipeline.render.overlay import _LABEL_STRIP, COLORMAP, encode_png

GREY = np.full((64, 64, 3), 128, dtype=np.uint8)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful test image (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, 96.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _blob(size: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / 4.0)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _render(query_shape: tuple[int, int], reference_shape: tuple[int, int], **kwargs: object) -> np.ndarray:
    png = render_pair_png(
        _photo(*query_shape), _photo(*reference_shape, seed=1), _blob(), _blob(),
        similarity=0.873, metric="cosine", **kwargs,
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return _decode(png)


def test_overlay_shape_and_dtype() -> None:
    out = heatmap_overlay(_photo(50, 80), np.random.default_rng(0).normal(size=(7, 7)))
    assert out.shape == (50, 80, 3)
    assert out.dtype == np.uint8


def test_overlay_matches_a_float_blend() -> None:
    from matplotlib import colormaps

    image, saliency = _photo(50, 80), np.random.default_rng(3).normal(size=(7, 7))
    values = np.maximum(saliency, 0)
    values = (values - values.min()) / (values.max() - values.min())
    upsampled = np.asarray(Image.fromarray(values.astype(np.float32)).resize((80, 50), Image.Resampling.BILINEAR))
    level = np.round(np.clip(upsampled, 0, 1) * 255) / 255  # 256 steps, for the colour and the opacity
    colour = np.round(colormaps[COLORMAP](level)[..., :3] * 255)
    weight = (0.5 * np.sqrt(level))[..., None]
    grey = (image @ np.array([0.299, 0.587, 0.114]))[..., None]  # the photo in grey under the colours
    expected = grey * (1 - weight) + colour * weight
    assert np.abs(heatmap_overlay(image, saliency).astype(float) - expected).max() <= 1.5


def test_the_photos_own_colours_are_never_read_as_evidence() -> None:
    """A red object where the map is cold looked like the colour map's hottest red."""
    photo = np.full((64, 64, 3), 40, dtype=np.uint8)
    photo[8:24, 8:24] = (230, 20, 20)  # a red square
    saliency = np.zeros((8, 8))
    saliency[5:, 5:] = 1.0  # evidence elsewhere
    out = heatmap_overlay(photo, saliency).astype(int)
    square = out[8:24, 8:24]
    assert np.array_equal(square[..., 0], square[..., 1]) and np.array_equal(square[..., 1], square[..., 2])
    assert abs(int(square[0, 0, 0]) - round(0.299 * 230 + 0.587 * 20 + 0.114 * 20)) <= 1


def test_overlay_colours_hot_regions_and_leaves_cold_ones() -> None:
    saliency = np.zeros((8, 8))
    saliency[:, :4] = -5.0  # negative evidence is clipped like zero
    saliency[:, 4:] = 2.0
    out = heatmap_overlay(GREY, saliency, alpha=0.6).astype(int)
    # bilinear upsampling blends only around the boundary at x = 32
    assert np.array_equal(out[:, :24], GREY[:, :24])
    assert np.abs(out[:, 40:] - 128).sum(axis=-1).min() > 30


def test_overlay_opacity_grows_with_the_map() -> None:
    saliency = np.tile(np.linspace(0.0, 1.0, 16), (16, 1))
    change = np.abs(heatmap_overlay(GREY, saliency).astype(int) - 128).sum(axis=-1).mean(axis=0)
    assert change[0] == 0
    assert change[-1] > change[32] > 0


@pytest.mark.parametrize(
    "saliency",
    [np.full((7, 7), 3.0), np.full((7, 7), -1.0), np.zeros((0, 0)), np.full((7, 7), np.nan)],
    ids=["constant", "negative", "empty", "nan"],
)
def test_overlay_without_signal_leaves_the_image(saliency: np.ndarray) -> None:
    image = _photo(40, 30)
    with np.errstate(all="raise"):
        out = heatmap_overlay(image, saliency)
    assert np.array_equal(out, image)


def test_overlay_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        heatmap_overlay(GREY.astype(np.float32), np.ones((7, 7)))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_overlay(GREY, np.ones((1, 7, 7)))
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(GREY, np.ones((7, 7)), alpha=1.5)


def test_pair_png_panels_follow_aspect_ratios() -> None:
    squares = _render((100, 100), (64, 64))
    wide = _render((64, 128), (100, 100))
    # both squares become 256 x 256 panels; the 64 x 128 image becomes 256 x 512
    assert wide.shape[0] == squares.shape[0]
    assert wide.shape[1] - squares.shape[1] == 512 - 256
    taller = _render((64, 128), (100, 100), panel_height=320)
    assert taller.shape[0] - wide.shape[0] == 320 - 256
    assert taller.shape[1] - wide.shape[1] == (640 + 320) - (512 + 256)
    assert wide.shape[0] > 256


def test_a_panel_whose_map_has_no_positive_evidence_says_so(rng: np.random.Generator, monkeypatch) -> None:
    """An all-negative map draws no colour: the panel's label says why, not a picture that looks failed."""
    drawn: list[str] = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, content, *a, **k: (drawn.append(content),
                                                                                        text(self, xy, content, *a, **k)))
    picture = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    positive = rng.random((7, 7)) + 0.1
    render_pair_png(picture, picture, -positive, positive, similarity=-0.8, metric="cosine")
    assert "query: no positive evidence" in drawn and "reference" in drawn
    assert "reference: no positive evidence" not in drawn


def test_pair_png_is_not_blank() -> None:
    image = _render((64, 64), (80, 60), title="pair-17", top_channels=[3, 1, 4])
    assert image.std() > 20
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000


def test_pair_png_draws_boxes_in_original_coordinates() -> None:
    plain = _render((64, 64), (64, 64))
    boxed = _render((64, 64), (64, 64), query_box=(8, 8, 40, 40), reference_box=[0, 0, 63, 63])
    assert plain.shape == boxed.shape
    cyan = np.all(boxed == (0, 255, 255), axis=-1)
    assert cyan.sum() > 4 * 2 * 100  # two outlines of >= 4 sides, 2 px wide, >= 100 px long
    ys, xs = np.nonzero(cyan)
    assert xs.min() >= 8 and ys.max() - ys.min() >= 250  # the reference box spans its whole panel


def test_pair_png_draws_correspondences_between_the_panels() -> None:
    plain = _render((64, 64), (80, 60))
    matches = [((10.0, 12.0), (70.0, 50.0)), ((40.0, 40.0), (5.0, 5.0))]
    lined = _render((64, 64), (80, 60), correspondences=matches)
    assert plain.shape == lined.shape
    magenta = np.all(lined == (255, 0, 255), axis=-1)
    assert magenta.sum() > 2 * 2 * 200  # two lines, 2 px wide, crossing the gap between the panels
    assert not np.all(plain == (255, 0, 255), axis=-1).any()
    gap = magenta[:, lined.shape[1] // 2 - 3 : lined.shape[1] // 2 + 3]
    assert gap.any()  # the lines join the two panels


def test_pair_png_untrusted_title_is_shortened_not_grown() -> None:
    plain = _render((64, 64), (64, 64))
    titled = _render((64, 64), (64, 64), title="../../" + "x" * 10_000 + "\n\t<b>", top_channels=np.arange(500))
    assert titled.shape == plain.shape


def test_pair_png_caps_extreme_aspect_ratios() -> None:
    image = _render((10, 4000), (4000, 10))
    assert image.shape[1] < 4 * 256 + 300


def test_pair_png_labels_of_a_very_tall_image_stay_apart() -> None:
    """A 5000 x 3 px query becomes a 1 px wide panel: its label and the reference's do not overlap."""
    image = _render((5000, 3), (64, 64))
    label_strip = image[:_LABEL_STRIP].min(axis=-1) < 100  # dark text pixels
    columns = np.flatnonzero(label_strip.any(axis=0))
    assert np.diff(columns).max() >= 12  # the gap between "query" and "reference", not letters run together


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (29, 1), (61, 83)])
def test_encode_png_is_lossless(shape: tuple[int, int]) -> None:
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    png = encode_png(rgb)
    decoded = Image.open(io.BytesIO(png))
    decoded.load()  # checks every chunk's CRC and the zlib stream
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_encode_png_compresses_about_as_well_as_pillow() -> None:
    image = _photo(300, 400)
    pillow = io.BytesIO()
    Image.fromarray(image).save(pillow, format="PNG")  # zlib level 6, adaptive filters
    assert len(encode_png(image)) < 1.1 * len(pillow.getvalue())


def test_a_result_rows_caption_says_what_its_maps_are() -> None:
    """The job's overlays showed the pair id only: a matched map read as a cis one (sfam explain names it)."""
    from pipeline.render.result_row import _title

    assert _title({"pair_id": "q1/g2", "target_layer": "layer4", "weighting": "matched"}) == "q1/g2 · layer4 · matched map"
    assert _title({"pair_id": "q1/g2"}) == "q1/g2"  # a row read without them
