"""Audit inputs written like a retrieval system would: images, a manifest, model weights."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline import SFAM
from pipeline.config import JobConfig
from pipeline.io.images import decode_image, resize_for_model, to_model_tensor
from pipeline.io.storage import StorageOptions, join_uri, read_bytes, write_bytes
from pipeline.models.spec import IMAGENET_MEAN, IMAGENET_STD

INPUT_SIZE = 64


def small_resnet() -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, 16)
    return model.eval()


def model_config(weights_uri: str) -> dict:
    return {"arch": "resnet18", "embedding_dim": 16, "input_size": INPUT_SIZE, "weights": weights_uri}


def job_config(root: str, options: StorageOptions, manifest: str, run_id: str, **overrides) -> JobConfig:
    """The job config of an audit written by write_audit, with its weights at {root}/models/model.pt."""
    return JobConfig.model_validate({
        "manifest": manifest, "output": join_uri(root, "audits"), "run_id": run_id,
        "model": model_config(join_uri(root, "models", "model.pt")), "batch_size": 8, "num_actors": 1,
        "max_image_pixels": 2_000_000, "storage_options": options.model_dump(), **overrides,
    })


def write_weights(uri: str, options: StorageOptions) -> nn.Module:
    model = small_resnet()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes(uri, buffer.getvalue(), options)
    return model


def picture_bytes(rng: np.random.Generator, width: int, height: int, fmt: str = "PNG") -> bytes:
    """A smooth random picture (not noise, so decoding and resizing are exercised realistically)."""
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, format=fmt)
    return buffer.getvalue()


def png(width: int, height: int, stream: bytes, bits: int = 8) -> bytes:
    """An RGB PNG of `bits` bits a channel declaring width x height pixels, `stream` its compressed rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bits, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG that declares width x height pixels but holds almost nothing."""
    return png(width, height, zlib.compress(b"\x00" * 64))


def black_png(width: int, height: int) -> bytes:
    """A valid PNG of width x height black pixels: a small file that is huge once decoded."""
    compressor, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)  # filter byte + RGB
    return png(width, height, b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush())


def noise_png_16_bits(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A valid RGB PNG of 16 bits a channel, of noise: 6 bytes a pixel that do not compress."""
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rng.integers(0, 256, (height, 6 * width), np.uint8)], axis=1)
    return png(width, height, zlib.compress(rows.tobytes(), 1), bits=16)


def manifest_table(rows: list[dict]) -> pa.Table:
    box = pa.list_(pa.float32())
    schema = pa.schema([
        ("pair_id", pa.string()), ("query_uri", pa.string()), ("reference_uri", pa.string()),
        ("label", pa.int8()), ("rank", pa.int32()), ("score", pa.float32()),
        ("query_bbox", box), ("reference_bbox", box), ("team", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(uri: str, table: pa.Table, options: StorageOptions) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), options)


def write_audit(root: str, options: StorageOptions, rng: np.random.Generator, queries: int = 3, top_k: int = 4,
                bad_rows: bool = False, pair_ids: list[str] | None = None, fmt: str = "PNG") -> tuple[str, list[dict]]:
    """Images under root/img (in format `fmt`), manifest at root/pairs.parquet with relative URIs;
    returns (uri, rows). `pair_ids` replaces the good rows' ids (queries * top_k of them)."""
    gallery = max(2 * queries, top_k + 1)
    suffix = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for name, count in (("q", queries), ("g", gallery)):
        for i in range(count):
            data = picture_bytes(rng, int(rng.integers(48, 96)), int(rng.integers(48, 96)), fmt)
            write_bytes(join_uri(root, "img", f"{name}{i}.{suffix}"), data, options)
    rows = []
    for q in range(queries):
        for rank, g in enumerate(rng.choice(gallery, size=top_k, replace=False), start=1):
            rows.append({"pair_id": f"q{q}/g{g}", "query_uri": f"img/q{q}.{suffix}", "reference_uri": f"img/g{g}.{suffix}",
                         "label": int(g // 2 == q), "rank": rank, "score": float(rng.random()),
                         "query_bbox": [4.0, 4.0, 40.0, 40.0], "reference_bbox": [8.0, 2.0, 30.0, 44.0], "team": "search"})
    for row, pair_id in zip(rows, pair_ids or []):
        row["pair_id"] = pair_id
    if bad_rows:
        write_bytes(join_uri(root, "img", "corrupt.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg body", options)
        write_bytes(join_uri(root, "img", "bomb.png"), bomb_png(), options)
        for pair_id, uri in (("bad/corrupt", "img/corrupt.jpg"), ("bad/missing", "img/nowhere.png"), ("bad/bomb", "img/bomb.png")):
            rows.append({"pair_id": pair_id, "query_uri": f"img/q0.{suffix}", "reference_uri": uri, "label": 0, "rank": 9,
                         "score": 0.0, "query_bbox": None, "reference_bbox": None, "team": "search"})
    manifest = join_uri(root, "pairs.parquet")
    write_table(manifest, manifest_table(rows), options)
    return manifest, rows


def expected_similarities(model, rows: list[dict], root: str, options: StorageOptions,
                          input_size: int | tuple[int, int] = INPUT_SIZE) -> dict[str, float]:
    """The SFAM API in-process, for the same pairs."""
    def image(uri: str) -> torch.Tensor:
        rgb = decode_image(read_bytes(join_uri(root, uri), options), uri, 10**8)
        return to_model_tensor(resize_for_model(rgb, input_size)[None], IMAGENET_MEAN, IMAGENET_STD)

    explainer = SFAM(model, "layer4")
    x = torch.cat([image(r["query_uri"]) for r in rows])
    y = torch.cat([image(r["reference_uri"]) for r in rows])
    return dict(zip([r["pair_id"] for r in rows], explainer.explain(x, y).similarity.tolist()))
