"""The mean-pooled ViT study trains its variant, keeps its weights, and scores it at every layer it names."""

from __future__ import annotations

import contextlib
import io

import pytest

from jobs.study_mean_pooled_vit import CHECKPOINT, LAYERS, main

pytestmark = pytest.mark.timeout(600)


def test_study_trains_once_and_scores_each_layer(tmp_path) -> None:
    argv = ["--pairs", "2", "--steps", "3", "--out-dir", str(tmp_path)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    text = printed.getvalue()
    assert "held-out Recall@1" in text and (tmp_path / CHECKPOINT).is_file()
    assert "| `pos_drop` (benchmarked, default) |" in text  # the default of a mean-pooled ViT
    assert all(f"| `{layer}`" in text for layer in LAYERS)
    weights = (tmp_path / CHECKPOINT).read_bytes()
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert main(argv) == 0
    assert "held-out Recall@1" not in again.getvalue() and (tmp_path / CHECKPOINT).read_bytes() == weights
