"""Whether an explanation explains: how much of the similarity the channel contributions carry.

Completeness says sum(CIS) + residual = similarity. When the residual is most of the
similarity, the maps show almost nothing of why the pair matched, and the user is told.
"""

from __future__ import annotations

import numpy as np

MOSTLY_RESIDUAL = 0.5  # a pair whose residual exceeds this share of its similarity explains little
MIN_SIMILARITY = 1e-3  # below this |similarity|, the share is not measured (nothing to explain)
NEAR_ZERO = 0.1  # a pair whose |similarity| is below this share of the run's median: its own small value makes the share large
LIKELY_CAUSE = (
    "the target layer's channels carry little of it (a class token's own state inside a ViT, a layer that "
    "barely feeds the embedding, or an L2 normalisation inside the head); docs/method.md, Limits, says what to try"
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
