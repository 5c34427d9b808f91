"""When the job and `sfam explain` warn: the residual carries most of the similarity, maps locate nothing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.quality import (
    boxes_outside_warning,
    empty_maps_warning,
    empty_pair_maps_warning,
    one_cell_maps_warning,
    residual_warning,
)


def test_warns_when_the_residual_is_most_of_the_similarity(rng: np.random.Generator) -> None:
    similarity = rng.uniform(0.5, 1.0, 50)
    large = similarity * rng.uniform(0.6, 0.9, 50)
    warning = residual_warning(similarity, large, -large, "cosine")
    assert warning is not None and "for 50 of 50 pair(s)" in warning
    assert residual_warning(similarity, large / 10, large / 10, "cosine") is None


def test_no_warning_for_euclidean_whose_residual_holds_the_partner_norm(rng: np.random.Generator) -> None:
    similarity = -rng.uniform(0.5, 1.0, 50)
    norm_term = -0.5 * rng.uniform(5.0, 10.0, 50)  # -1/2 |u^y|^2: large by construction
    assert residual_warning(similarity, norm_term, norm_term, "euclidean") is None
    assert residual_warning(similarity, norm_term, norm_term, "dot") is not None


def test_pairs_of_similarity_near_zero_are_not_counted(rng: np.random.Generator) -> None:
    """A model's constant residual (its biases' share) is most of a similarity near zero: those pairs
    say nothing of the target layer, so they alone raise no warning, and are named apart when others do."""
    similarity = np.concatenate([rng.uniform(0.5, 1.0, 47), [0.02, -0.015, 0.004]])
    residual = np.full(50, 0.03) * rng.choice([-1, 1], 50)  # 3 % to 6 % of the typical pair
    assert residual_warning(similarity, residual, residual, "cosine") is None
    residual[:5] = similarity[:5] * 0.8
    warning = residual_warning(similarity, residual, residual, "cosine")
    assert warning is not None and "for 5 of 50 pair(s)" in warning and "3 more of similarity near zero not counted" in warning


def test_empty_maps_and_boxes_outside_are_told_apart() -> None:
    """Both leave energy_in_box null; only a map that has a peak had a box to miss."""
    point, box = [3.0, 4.0], [0.0, 0.0, 10.0, 10.0]
    rows = pa.table({
        "query_peak_xy": [point, None, point, point], "reference_peak_xy": [point, point, None, point],
        "query_bbox": [box, box, box, None], "reference_bbox": [box, box, box, box],
        "query_energy_in_box": [0.5, None, None, None], "reference_energy_in_box": [0.5, 0.4, None, 0.2],
    })
    assert empty_maps_warning(rows).startswith("maps without positive evidence (1 query, 1 reference, of 4 ok pairs")
    assert boxes_outside_warning(rows).startswith("boxes wholly outside their image (1 query, 0 reference, of 4 ok pairs)")
    assert empty_maps_warning(rows.slice(0, 1)) is None and boxes_outside_warning(rows.slice(0, 1)) is None


def test_explain_names_the_sides_without_positive_evidence() -> None:
    assert empty_pair_maps_warning(()) is None
    assert empty_pair_maps_warning(("reference",)).startswith("the reference map has no positive evidence")
    assert empty_pair_maps_warning(("query", "reference")).startswith("the query and reference maps have no positive")


def test_maps_of_one_cell_are_told() -> None:
    """A pooled layer named as target_layer (avgpool) ran without a word: its maps locate nothing."""
    assert "the maps are 1 x 1" in one_cell_maps_warning(pa.array([[1, 1], None, [1, 1]]))
    assert one_cell_maps_warning(pa.array([[1, 1], [7, 7]])) is None
    assert one_cell_maps_warning(pa.array([None], pa.list_(pa.int32()))) is None
