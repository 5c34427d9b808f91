"""The demo audit is what a retrieval export would be, and the pipeline accepts it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.demo.audit import build_demo_audit
from pipeline.io.storage import StorageOptions
from pipeline.manifest import open_manifest, validate_manifest


def test_demo_manifest_passes_validation_and_boxes_lie_inside(tmp_path) -> None:
    manifest = build_demo_audit(tmp_path, queries=12, top_k=4, gallery=60)
    info = validate_manifest(open_manifest(str(manifest), StorageOptions()))
    assert info.num_rows == 48 and info.has_boxes
    rows = pq.read_table(manifest).to_pylist()
    assert {r["rank"] for r in rows} == {1, 2, 3, 4}
    assert 0 < sum(r["label"] for r in rows) < len(rows)  # true matches and mistakes
    assert all(r["label"] == int(r["query_digit"] == r["reference_digit"]) for r in rows)
    for row in rows:
        scores = [r["score"] for r in rows if r["query_uri"] == row["query_uri"]]
        assert scores == sorted(scores, reverse=True)
        for side in ("query", "reference"):
            width, height = Image.open(tmp_path / row[f"{side}_uri"]).size
            x0, y0, x1, y1 = row[f"{side}_bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert np.mean([r["label"] for r in rows if r["rank"] == 1]) > 0.6  # the model retrieves well
