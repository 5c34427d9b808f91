"""The model spec's names for metrics, weightings and layouts are the explainer's (the spec needs no torch)."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from pipeline.explain import layout, metrics, sfam
from pipeline.models import spec


def test_the_spec_names_what_the_explainer_takes() -> None:
    assert get_args(spec.Metric) == get_args(metrics.Metric)
    assert get_args(spec.Weighting) == get_args(sfam.Weighting)
    assert get_args(spec.LayoutName) == get_args(layout.LayoutName)


def test_a_digest_in_capitals_is_read_as_sha256sum_prints_it() -> None:
    digest = "AB" * 32  # Windows' Get-FileHash prints capitals
    assert spec.ModelSpec(arch="resnet18", weights="m.pt", weights_sha256=f" {digest}\n").weights_sha256 == digest.lower()
    assert spec.ModelSpec(arch="resnet18", weights="m.pt", weights_sha256=f"sha256:{digest}").weights_sha256 == digest.lower()
    with pytest.raises(ValidationError, match="weights_sha256"):
        spec.ModelSpec(arch="resnet18", weights="m.pt", weights_sha256="AB" * 31)
    with pytest.raises(ValidationError, match=r"weights_sha256\n.*a digest of digits only reads as a number: quote it"):
        spec.ModelSpec(arch="resnet18", weights="m.pt", weights_sha256=0)  # YAML's reading of 64 zeros
    with pytest.raises(ValidationError, match="weights_sha256 pins a weights file, but model.weights is not set"):
        spec.ModelSpec(arch="resnet18", weights_sha256=digest)  # was ignored: the random initialisation explained


def test_one_number_normalises_every_channel() -> None:
    model = spec.ModelSpec(arch="resnet18", mean=0.5, std=0.5)  # SigLIP's normalisation
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)
    with pytest.raises(ValidationError, match="std"):
        spec.ModelSpec(arch="resnet18", std=0)
    with pytest.raises(ValidationError, match="mean"):
        spec.ModelSpec(arch="resnet18", mean=True)
    for odd in ([0.5, 0.5], "0.5,0.5,0.5"):
        with pytest.raises(ValidationError, match=r"three numbers \(red, green, blue\), or one for all three"):
            spec.ModelSpec(arch="resnet18", mean=odd)


def test_a_normalisation_on_the_0_255_scale_is_refused() -> None:
    """Images are read as pixels from 0 to 1: ImageNet's mean and std written for 0-255 explained a
    constant picture (similarity 1.0 for every pair)."""
    with pytest.raises(ValidationError, match=r"mean\n.*\[123.675, 116.28, 103.53\] is on the 0-255 scale.*"
                                              r"divide by 255 \(\[0.485, 0.456, 0.406\]\)"):
        spec.ModelSpec(arch="resnet18", mean=[123.675, 116.28, 103.53])
    with pytest.raises(ValidationError, match="std"):
        spec.ModelSpec(arch="resnet18", std=58.395)
    assert spec.ModelSpec(arch="resnet18", mean=[-1, 0, 1], std=1).std == (1, 1, 1)
    assert spec.ModelSpec(arch="resnet18", std=2).std == (2, 2, 2)  # a scale, not a 0-255 std: was refused
