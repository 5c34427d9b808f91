"""The model spec's names for metrics, weightings and layouts are the explainer's (the spec needs no torch)."""

from __future__ import annotations

from typing import get_args

from pipeline.explain import layout, metrics, sfam
from pipeline.models import spec


def test_the_spec_names_what_the_explainer_takes() -> None:
    assert get_args(spec.Metric) == get_args(metrics.Metric)
    assert get_args(spec.Weighting) == get_args(sfam.Weighting)
    assert get_args(spec.LayoutName) == get_args(layout.LayoutName)
