"""The overlay of one result row: its stored maps drawn on the pair's display pictures.

The job renders the rows its policy selects (pipeline/render/selection.py); `sfam render`
draws any other row later with the same function, from the table and the images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.render.overlay import render_pair_png
from pipeline.schema import SIDES

# the columns of a row that its overlay is drawn from (the boxes only when the manifest has them)
OVERLAY_COLUMNS = ("pair_id", "similarity", "metric", "target_layer", "weighting", "cis_top_channels", "map_shape",
                   "map_query", "map_reference", "query_bbox", "reference_bbox", "correspondences")
DISPLAY_SIDE = 256  # longest side of the display picture a row's overlay is drawn on (job and sfam render)
MIN_PANEL_HEIGHT = 128  # small images are enlarged to this height, to stay readable
MAX_PANEL_HEIGHT = 256


def matches_in_pixels(matches: np.ndarray, grid: tuple[int, int], query_sizes: list, reference_sizes: list) -> list:
    """(P, k, 5) matches in feature-grid units (x_q, y_q, x_r, y_r, cos) -> per pair, a list of
    {query_xy, reference_xy, score} in the pixels of pictures of the given (width, height) sizes;
    the NaN rows of a pair with fewer than k matches are left out."""
    rows, cols = grid
    return [
        [{"query_xy": [float(xq * qw / cols), float(yq * qh / rows)],
          "reference_xy": [float(xr * rw / cols), float(yr * rh / rows)], "score": float(score)}
         for xq, yq, xr, yr, score in pair if not np.isnan(score)]
        for pair, (qw, qh), (rw, rh) in zip(matches, query_sizes, reference_sizes)
    ]


def _title(row: Mapping) -> str:
    """The caption's second line: the pair, and what its maps are (`sfam explain` shows the same)."""
    weighting = row.get("weighting")
    return " · ".join(str(part) for part in (row["pair_id"], row.get("target_layer"), weighting and f"{weighting} map")
                      if part)


def _box_on_display(box: list[float] | None, size: tuple[int, int], display: np.ndarray) -> list[float] | None:
    """A box in original pixels (x0, y0, x1, y1), scaled to the display picture's pixels."""
    if box is None:
        return None
    scale = display.shape[1] / size[0]
    return [v * scale for v in box]


def _matches_on_display(matches: list[dict] | None, sizes: Mapping[str, tuple[int, int]],
                        displays: Mapping[str, np.ndarray]) -> list[tuple[list[float], list[float]]]:
    """The row's correspondences (points in original pixels) as (query point, reference point) in display pixels."""
    scales = [displays[side].shape[1] / sizes[side][0] for side in SIDES]
    return [tuple([v * scale for v in match[f"{side}_xy"]] for side, scale in zip(SIDES, scales))
            for match in matches or []]


def render_result_row(row: Mapping[str, Any], displays: Mapping[str, np.ndarray], sizes: Mapping[str, tuple[int, int]]) -> bytes:
    """PNG overlay of a result row.

    row: the row's `pair_id`, `similarity`, `metric`, `cis_top_channels`, `map_shape`, `map_query`,
        `map_reference` and, when present, `target_layer`, `weighting`, `query_bbox`, `reference_bbox`,
        `correspondences`.
    displays: per side, the (h, w, 3) uint8 display picture; sizes: per side, the original
        (width, height) that the boxes are given in.
    """
    shape = row["map_shape"]
    maps = [np.asarray(row[f"map_{side}"], np.float32).reshape(shape) for side in SIDES]
    tallest = max(displays[side].shape[0] for side in SIDES)  # 4:3 pictures are drawn at their size, not enlarged
    return render_pair_png(
        displays["query"], displays["reference"], *maps,
        similarity=row["similarity"], metric=row["metric"], title=_title(row),
        top_channels=row["cis_top_channels"],
        query_box=_box_on_display(row.get("query_bbox"), sizes["query"], displays["query"]),
        reference_box=_box_on_display(row.get("reference_bbox"), sizes["reference"], displays["reference"]),
        panel_height=min(MAX_PANEL_HEIGHT, max(MIN_PANEL_HEIGHT, tallest)),
        correspondences=_matches_on_display(row.get("correspondences"), sizes, displays),
    )
