"""Localisation statistics against hand-computed answers on random maps and boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.localisation import Localisation, energy_in_box, localise, peak_xy, pointing_hit, upsample


def test_peak_xy_is_the_maximum_cells_centre_where_the_upsampled_map_peaks(rng) -> None:
    for _ in range(100):
        saliency = rng.random((7, 9)).astype(np.float32)
        row, col = rng.integers(7), rng.integers(9)
        saliency[row, col] = 2.0
        width, height = int(rng.integers(100, 900)), int(rng.integers(100, 900))
        x, y = peak_xy(saliency, (width, height))
        assert (x, y) == pytest.approx(((col + 0.5) * width / 9, (row + 0.5) * height / 7))
        if 0 < row < 6 and 0 < col < 8:  # away from the edges the upsampled map's maximum is there too
            peak_row, peak_col = np.unravel_index(int(np.argmax(upsample(saliency, width, height))), (height, width))
            assert abs(peak_col + 0.5 - x) <= 1 and abs(peak_row + 0.5 - y) <= 1


@pytest.mark.parametrize("side", [2, 4])
def test_a_peak_by_an_edge_points_at_its_cell_not_at_the_edge(side: int, rng) -> None:
    """Bilinear upsampling is flat from an edge cell's centre out to the border; the first of
    those pixels lies on the top or left edge, outside a box a few pixels in (every peak of a
    2 x 2 map missed such boxes)."""
    image = (120, 96)
    cell = (image[0] / side, image[1] / side)
    for row in range(side):
        for col in range(side):
            saliency = rng.random((side, side)).astype(np.float32) * 0.1
            saliency[row, col] = 1.0
            centre = ((col + 0.5) * cell[0], (row + 0.5) * cell[1])
            box = (centre[0] - 5, centre[1] - 5, centre[0] + 5, centre[1] + 5)
            assert localise(saliency, image, box).pointing_hit, (row, col)


def test_the_stored_peak_is_the_one_the_pointing_game_tests(rng) -> None:
    """Near-tied cells: peak_xy inside the box exactly when pointing_hit says so."""
    for _ in range(200):
        saliency = (1 + 1e-3 * rng.random((7, 7))).astype(np.float16).astype(np.float32)
        image = (int(rng.integers(64, 640)), int(rng.integers(64, 640)))
        box = sorted(rng.uniform(0, image[0], 2)) , sorted(rng.uniform(0, image[1], 2))
        box = (box[0][0], box[1][0], box[0][1], box[1][1])
        x, y = peak_xy(saliency, image)
        assert pointing_hit(saliency, box, image) == (box[0] <= x <= box[2] and box[1] <= y <= box[3])


def test_energy_in_box_is_the_share_of_positive_mass(rng) -> None:
    """A box that covers whole cells of a map at the image's grid: the share is a plain sum."""
    saliency = rng.normal(size=(16, 16))
    image = (128, 128)  # one map cell = 8 x 8 pixels, upsampled 8x on a 128-cell grid
    box = (32.0, 16.0, 96.0, 64.0)
    grid = upsample(np.maximum(saliency, 0), *image)
    ys, xs = np.arange(128) + 0.5, np.arange(128) + 0.5
    inside = ((ys >= 16) & (ys <= 64))[:, None] & ((xs >= 32) & (xs <= 96))[None, :]
    expected = grid[inside].sum() / grid.sum()
    assert energy_in_box(saliency, box, image) == pytest.approx(expected, rel=1e-5)
    assert energy_in_box(saliency, (0.0, 0.0, 128.0, 128.0), image) == pytest.approx(1.0)
    assert math.isnan(energy_in_box(-np.abs(saliency) - 1, box, image))  # no positive mass: undefined


def test_pointing_hit_follows_the_peak(rng) -> None:
    saliency = rng.random((8, 8)) * 0.1
    saliency[2, 5] = 1.0  # cell centre at pixel (5.5 * 40, 2.5 * 30) in a 320 x 240 image
    image = (320, 240)
    assert pointing_hit(saliency, (200.0, 60.0, 240.0, 90.0), image)
    assert not pointing_hit(saliency, (0.0, 0.0, 100.0, 100.0), image)


def test_non_square_images_map_linearly(rng) -> None:
    """Maps cover the whole image resized without cropping: a peak in the last column lands at the right edge."""
    saliency = rng.random((4, 4)) * 0.1
    saliency[1, 3] = 1.0
    x, y = peak_xy(saliency, (1000, 200))
    assert 750 - 1000 / 128 <= x <= 1000 and 50 - 1000 / 128 <= y <= 100 + 1000 / 128
    assert pointing_hit(saliency, (760.0, 50.0, 1000.0, 100.0), (1000, 200))


@pytest.mark.parametrize("signed", [False, True])
def test_localise_gives_the_three_statistics_at_once(signed: bool, rng) -> None:
    for _ in range(50):
        saliency = rng.normal(size=(7, 9)) if signed else rng.random((7, 9))
        image = (int(rng.integers(50, 900)), int(rng.integers(50, 900)))
        xs, ys = sorted(rng.uniform(0, image[0], 2)), sorted(rng.uniform(0, image[1], 2))
        box = (xs[0], ys[0], xs[1], ys[1])
        found = localise(saliency, image, box)
        assert found.peak_xy == peak_xy(saliency, image)
        assert found.energy_in_box == pytest.approx(energy_in_box(saliency, box, image), rel=1e-6, nan_ok=True)
        assert found.pointing_hit == pointing_hit(saliency, box, image)
        assert localise(saliency, image) == Localisation(peak_xy(saliency, image))


@pytest.mark.parametrize("saliency", [np.zeros((7, 7)), -np.ones((7, 7)) * np.arange(1, 8)])
def test_a_map_without_positive_evidence_locates_nothing(saliency: np.ndarray) -> None:
    """All zero (a `cis` map of a pair the channels oppose) or nowhere positive: its maximum was an
    arbitrary cell (the top-left one), which counted as a pointing hit whenever a box covered it."""
    assert localise(saliency, (640, 480), (0.0, 0.0, 100.0, 100.0)) == Localisation()


def test_peaks_stay_inside_images_of_extreme_aspect(rng) -> None:
    """A 5000 x 3 image has a one-cell-high grid: its y scale is its own, not the x axis's."""
    for width, height in [(5000, 3), (3, 5000), (1000, 7)]:
        saliency = rng.random((7, 7)) + 0.1
        x, y = localise(saliency, (width, height)).peak_xy
        assert 0 <= x <= width and 0 <= y <= height, (width, height, x, y)
        whole = (0.0, 0.0, float(width), float(height))
        assert localise(saliency, (width, height), whole).energy_in_box == pytest.approx(1.0)
