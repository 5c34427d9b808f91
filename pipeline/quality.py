"""Whether a run's explanations explain: how much of the similarity the channel contributions
carry, and which maps locate nothing (the run's warnings).

Completeness says sum(CIS) + residual = similarity. When the residual is most of the
similarity, the maps show almost nothing of why the pair matched, and the user is told.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow_columns import count_true
from pipeline.schema import SIDES

MOSTLY_RESIDUAL = 0.5  # a pair whose residual exceeds this share of its similarity explains little
MIN_SIMILARITY = 1e-3  # below this |similarity|, the share is not measured (nothing to explain)
NEAR_ZERO = 0.1  # a pair whose |similarity| is below this share of the run's median: its own small value makes the share large
LIKELY_CAUSE = (
    "the target layer's channels carry little of it (a class token's own state inside a ViT, a layer that "
    "barely feeds the embedding, an embedding that joins branches of which the layer is in one, or an L2 "
    "normalisation inside the head); docs/method.md, Limits, says what to try"
)


def residual_share(similarity: np.ndarray, residual_query: np.ndarray, residual_reference: np.ndarray) -> np.ndarray:
    """Per pair, mean(|residual of each side|) / |similarity|; NaN where |similarity| is tiny."""
    similarity = np.abs(np.asarray(similarity, np.float64))
    residual = (np.abs(np.asarray(residual_query, np.float64)) + np.abs(np.asarray(residual_reference, np.float64))) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(similarity > MIN_SIMILARITY, residual / similarity, np.nan)


def residual_warning(similarity: np.ndarray, residual_query: np.ndarray, residual_reference: np.ndarray,
                     metric: str) -> str | None:
    """A one-line warning when the residual is most of the similarity for a pair or the run.

    None for "euclidean": its residual holds -1/2 |u^y|^2 by construction (docs/method.md), so
    its share says nothing of the target layer.
    """
    if metric == "euclidean":
        return None
    share = residual_share(similarity, residual_query, residual_reference)
    measured = share[~np.isnan(share)]
    if measured.size == 0:
        return None
    # the model's constant share of a similarity near zero is most of it: not a sign of the layer
    magnitude = np.abs(np.asarray(similarity, np.float64))[~np.isnan(share)]
    near_zero = magnitude < NEAR_ZERO * np.median(magnitude)
    mostly = measured > MOSTLY_RESIDUAL
    counted = int((mostly & ~near_zero).sum())
    if counted == 0:
        return None
    left_out = int((mostly & near_zero).sum())
    also = f"; {left_out} more of similarity near zero not counted" if left_out else ""
    return (f"the residual is more than {MOSTLY_RESIDUAL:.0%} of the similarity for {counted} of {measured.size} "
            f"pair(s) (median share {np.median(measured):.2f}{also}): {LIKELY_CAUSE}")


def empty_pair_maps_warning(sides: Sequence[str]) -> str | None:
    """What `sfam explain` says when the maps of `sides` ("query", "reference") have no positive evidence, or None."""
    if not sides:
        return None
    return (f"the {' and '.join(sides)} map{'s have' if len(sides) > 1 else ' has'} no positive evidence (typical of a "
            "pair of low or negative similarity: the channels that agree are outweighed): the overlay draws nothing there")


def empty_maps_warning(ok_rows: pa.Table) -> str | None:
    """How many ok rows have a map without positive evidence (nothing to locate), or None."""
    empty = {side: ok_rows[f"{side}_peak_xy"].null_count for side in SIDES}
    if not any(empty.values()):
        return None
    counts = ", ".join(f"{count} {side}" for side, count in empty.items())
    return (f"maps without positive evidence ({counts}, of {ok_rows.num_rows} ok pairs; typically pairs of low or "
            "negative similarity): their peak_xy, energy_in_box and pointing_hit are null")


def one_cell_maps_warning(map_shapes: pa.Array | pa.ChunkedArray) -> str | None:
    """A warning when every map_shape ([h, w]; nulls left out) is one cell (a target layer already
    pooled), or None."""
    cells = pc.multiply(pc.list_element(map_shapes, 0), pc.list_element(map_shapes, 1))  # h * w, each >= 1
    if pc.max(cells).as_py() != 1:
        return None
    return ("the maps are 1 x 1 (the target layer's output is already pooled): they locate nothing, only the CIS "
            "mean something; name a layer with a spatial grid as target_layer, or leave it out for the default")


def boxes_outside_warning(ok_rows: pa.Table) -> str | None:
    """How many ok rows have a box wholly outside their image (their localisation is null), or None."""
    outside = {side: count_true(pc.and_(pc.and_(pc.is_valid(ok_rows[f"{side}_bbox"]), pc.is_valid(ok_rows[f"{side}_peak_xy"])),
                                           pc.is_null(ok_rows[f"{side}_energy_in_box"])))
               for side in SIDES if f"{side}_bbox" in ok_rows.column_names}
    if not any(outside.values()):
        return None
    counts = ", ".join(f"{count} {side}" for side, count in outside.items())
    return (f"boxes wholly outside their image ({counts}, of {ok_rows.num_rows} ok pairs): their energy_in_box and "
            "pointing_hit are null; a box is (x0, y0, x1, y1) in the pixels of the image as stored, before any resize")
