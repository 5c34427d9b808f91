"""The demo's audit input: a gallery and queries of cluttered digits, retrieved by the demo model.

Writes what a retrieval system's audit export would hold: the images and a manifest of each
query's top-k gallery results (pair_id, query_uri, reference_uri, rank, score, label,
query_bbox, reference_bbox), so it holds true matches and the model's mistakes alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.demo.canvas import make_dataset
from pipeline.demo.model import EMBEDDING_LAYER, INPUT_SIZE, MEAN, STD, TARGET_LAYER, demo_model
from pipeline.io.images import to_model_tensor

DEMO_SEED = 20261126  # used nowhere else: not in training, not in the benchmarks
GALLERY_SIZE = 80
MODEL_SPEC = {
    "arch": "pipeline.demo.model:demo_model", "embedding_layer": EMBEDDING_LAYER, "target_layer": TARGET_LAYER,
    "metric": "cosine", "input_size": INPUT_SIZE, "mean": list(MEAN), "std": list(STD),
}


def _save(folder: Path, prefix: str, images: np.ndarray) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}_{i:04d}.png")
        names.append(f"{folder.name}/{prefix}_{i:04d}.png")
    return names


def build_demo_audit(folder: Path, queries: int, top_k: int, gallery: int = GALLERY_SIZE) -> Path:
    """Writes images under folder/images and the manifest folder/pairs.parquet; returns its path."""
    rng = np.random.default_rng(DEMO_SEED)
    gallery_images, gallery_labels, gallery_boxes = make_dataset(rng, gallery, split="test")
    query_images, query_labels, query_boxes = make_dataset(rng, queries, split="test")
    model = demo_model()
    with torch.inference_mode():
        embed = lambda images: model(to_model_tensor(images, MEAN, STD))  # noqa: E731  (N, D) unit norm
        scores = embed(query_images) @ embed(gallery_images).T  # (Q, G) cosine
    top_scores, top_index = scores.topk(top_k, dim=1)
    gallery_uris = _save(folder / "images", "gallery", gallery_images)
    query_uris = _save(folder / "images", "query", query_images)
    rows = [
        {"pair_id": f"q{q:04d}-r{rank + 1}", "query_uri": query_uris[q], "reference_uri": gallery_uris[g],
         "rank": rank + 1, "score": float(top_scores[q, rank]), "label": int(query_labels[q] == gallery_labels[g]),
         "query_bbox": query_boxes[q].tolist(), "reference_bbox": gallery_boxes[g].tolist(),
         "query_digit": int(query_labels[q]), "reference_digit": int(gallery_labels[g])}
        for q in range(queries) for rank, g in enumerate(top_index[q].tolist())
    ]
    box = pa.list_(pa.float32())
    schema = pa.schema([
        ("pair_id", pa.string()), ("query_uri", pa.string()), ("reference_uri", pa.string()), ("rank", pa.int32()),
        ("score", pa.float32()), ("label", pa.int8()), ("query_bbox", box), ("reference_bbox", box),
        ("query_digit", pa.int8()), ("reference_digit", pa.int8()),
    ])
    manifest = folder / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), manifest)
    return manifest
