"""Thresholds that several layers share (the job's render flags and gates, the comparison and its page)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

FALSE_MATCH_SIMILARITY = 0.8  # the default similarity at and above which a label-0 pair is a false match
MOVED_BELOW = 0.99  # a pair's maps moved when they correlate below this (the same maps, one rounded to float16 as earlier runs stored them, correlate above)


def recorded_false_match_similarity(record: Mapping[str, Any]) -> float | None:
    """A run's own false-match threshold, from its record's config (gates.false_match_similarity);
    None for a Euclidean run whose threshold is above 0, which no similarity (-1/2 |u - v|^2) reaches."""
    config = record.get("config") or {}
    threshold = float((config.get("gates") or {}).get("false_match_similarity", FALSE_MATCH_SIMILARITY))
    metric = record.get("metric") or (config.get("model") or {}).get("metric")
    return None if metric == "euclidean" and threshold > 0 else threshold


def outside_cosine_range(threshold: float, metric: str) -> str | None:
    """Why a false-match `threshold` means nothing for a cosine model (above 1: no pair counts; below -1:
    every different-label pair does), or None."""
    if metric == "cosine" and not -1 <= threshold <= 1:
        counted = "no pair" if threshold > 1 else "every different-label pair"
        return (f"{threshold:g} is outside cosine similarity's range [-1, 1], so {counted} would count as a false "
                "match: e.g. 0.8")
    return None


def is_false_match(label: np.ndarray, similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Per pair, whether it is a false match: label 0 and similarity at or above `threshold`.
    label and similarity: float arrays, NaN where missing (never a false match)."""
    return (label == 0) & (similarity >= threshold)


def false_match_rule(threshold: float | None) -> str:
    """What a false match is at `threshold` (recorded_false_match_similarity), in words."""
    if threshold is None:
        return ("none counted: the run's false_match_similarity is above every euclidean similarity "
                "(-1/2 |u - v|^2 <= 0); give a threshold in the metric's units")
    return f"label 0 and similarity at or above {threshold:g}"
