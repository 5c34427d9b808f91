"""The job end to end on a Vision Transformer (timm, class token, random weights): tokens as the
target layer's layout, the default target layer recorded per row, repeated images, completeness."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.distributed.job import run_audit
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageOptions, join_uri

from audit_data import job_config, write_audit

pytestmark = pytest.mark.timeout(400)
VIT = {"arch": "timm/vit_tiny_patch16_224", "input_size": 64, "embedding_dim": 32}


def test_a_vit_audit(local_ray, tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    manifest, rows = write_audit(root, options, rng, queries=3, top_k=4)  # each query in 4 pairs: repeated images
    config = job_config(root, options, manifest, "vit-1", model=VIT, render_png="all")
    summary = run_audit(config)
    assert (summary.pairs, summary.ok) == (len(rows), len(rows))
    assert summary.forward_passes_per_pair < 1.6  # repeated images are forwarded once
    table = HiveParquetStore(config.output, options).read(run_id="vit-1")
    layers = set(table.column("target_layer").to_pylist())
    assert layers == {"pos_drop"}  # class-token pooling: the tokens entering the first block, not the patch embedding
    assert {tuple(s) for s in table.column("map_shape").to_pylist()} == {(4, 4)}  # 64 px / patch 16: the patch grid
    similarity = table.column("similarity").to_numpy()
    for side in ("query", "reference"):
        cis = np.array([sum(v) for v in table.column(f"cis_{side}").to_pylist()])
        residual = table.column(f"residual_{side}").to_numpy()
        np.testing.assert_allclose(cis + residual, similarity, atol=1e-4)  # completeness, stored in float32
    assert pc.all(pc.equal(table.column("status"), "ok")).as_py()
    assert all(uri and uri.endswith(".png") for uri in table.column("png_uri").to_pylist())
    assert join_uri(config.output, "png") in table.column("png_uri")[0].as_py()
