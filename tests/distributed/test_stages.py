"""The stages on their own, without Ray."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.distributed import explain as explain_stage
from pipeline.distributed.explain import ExplainPairs
from pipeline.distributed.fetch import FetchImages
from pipeline.distributed.render import RenderResults
from pipeline.distributed.stages import StageChain
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.layout import RunLayout
from pipeline.models.spec import ModelSpec
from pipeline.render.selection import FlagRules
from pipeline.schema import SIDES, result_type

from audit_data import (
    black_png,
    expected_similarities,
    manifest_table,
    model_config,
    noise_png_16_bits,
    picture_bytes,
    write_audit,
    write_weights,
)


def test_each_distinct_image_is_forwarded_once(tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=5, bad_rows=True)
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    fetched = FetchImages(root, spec.input_size, 2_000_000, options)(pq.read_table(manifest))
    assert fetched.column("status").to_pylist().count("error") == 3

    explain = ExplainPairs(spec, options, "a1", 2_000_000)
    forwarded: list[int] = []
    explain.explainer.sfam.model.conv1.register_forward_hook(lambda _m, inputs, _o: forwarded.append(inputs[0].shape[0]))
    explained = explain(fetched)
    distinct = len({r["query_uri"] for r in rows[:10]} | {r["reference_uri"] for r in rows[:10]})
    # one forward of the batch: the actor's trial explanation found the target layer and measured the head
    assert forwarded == [distinct]
    forwarded.clear()
    explain(fetched)
    assert forwarded == [distinct]
    assert abs(sum(v or 0 for v in explained.column("forward_share").to_pylist()) - distinct) < 1e-4
    assert explained.column("similarity").null_count == 3
    row = explained.filter(pc.equal(explained.column("status"), "ok")).slice(0, 1).to_pylist()[0]
    shared = np.asarray(row["cis_query"]) + np.asarray(row["cis_reference"])
    assert row["cis_top_channels"] == np.argsort(-shared, kind="stable")[:10].tolist()

    layout = RunLayout(str(tmp_path / "out"), "r1", "2026-11-26", "a1")
    result = RenderResults(layout, "all", FlagRules(), options)(explained)
    assert not [name for name in result.column_names if name.startswith("_")]
    pngs = [uri for uri in result.column("png_uri").to_pylist() if uri]
    assert len(pngs) == 10 and all(uri.startswith(layout.png_dir) for uri in pngs)


def test_fetch_reads_a_batchs_objects_at_once(s3_bucket, rng, monkeypatch) -> None:
    """An object store answers each read after its latency: the fetch keeps several reads in
    flight (counted, not timed), and every image still lands in its own rows."""
    from pipeline.distributed import fetch

    bucket, options = s3_bucket
    root = f"s3://{bucket}/audit"
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=5, bad_rows=True)
    in_flight, most = [0], [0]
    lock = threading.Lock()
    read = fetch.read_bytes

    def slow_read(*args, **kwargs) -> bytes:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.05)
            return read(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(fetch, "read_bytes", slow_read)
    table = manifest_table(rows)
    fetched = FetchImages(root, 32, 2_000_000, options)(table)
    monkeypatch.setattr(fetch, "read_bytes", read)
    alone = FetchImages(root, 32, 2_000_000, options)(table)
    assert most[0] > 1
    assert fetched.to_pydict() == alone.to_pydict() and fetched.column("status").to_pylist().count("error") == 3


@pytest.mark.parametrize(("module", "forbidden"), [
    ("fetch", {"torchvision"}), ("render", {"torch", "torchvision"}), ("part_files", {"torch", "torchvision"}),
])
def test_a_task_imports_only_what_its_stage_needs(module: str, forbidden: set[str]) -> None:
    """Ray starts a process per task slot, and each imports the module of the stages it runs: one
    that fetches must not import torchvision (2.5 s here), one that renders or writes not torch
    either (6 s here with torchvision, more on a cluster's node at every start)."""
    code = (f"import sys; import pipeline.distributed.{module}; "
            "print(*[name for name in ('torch', 'torchvision') if name in sys.modules])")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not set(imported) & forbidden


def test_stage_chain_builds_its_stages_and_runs_them_in_order(tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=2, top_k=3, bad_rows=True)
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    kwargs = [
        {"manifest_dir": root, "input_size": spec.input_size, "max_image_pixels": 2_000_000, "storage_options": options},
        {"model": spec, "storage_options": options, "attempt": "a1", "max_image_pixels": 2_000_000},
        {"layout": RunLayout(str(tmp_path / "out"), "r1", "2026-11-26", "a1"), "policy": "all", "rules": FlagRules(),
         "storage_options": options},
    ]
    stages = list(zip((FetchImages, ExplainPairs, RenderResults), kwargs))
    batch = pq.read_table(manifest)
    chained = StageChain(stages)(batch)
    one_by_one = batch
    for stage, arguments in stages:
        one_by_one = stage(**arguments)(one_by_one)
    assert chained.column_names == one_by_one.column_names
    assert not [name for name in chained.column_names if name.startswith("_")]
    for name in ("pair_id", "status", "error", "png_uri"):
        assert chained.column(name).to_pylist() == one_by_one.column(name).to_pylist(), name
    similarities = [np.array(table.column("similarity").to_pylist(), dtype=float) for table in (chained, one_by_one)]
    np.testing.assert_allclose(*similarities, rtol=1e-5)  # NaN (failed rows) in the same places


def bogus_huffman_table_jpeg(rng) -> bytes:
    """A whole JPEG whose first Huffman table counts more codes than it can hold: its header reads
    well, torchvision refuses to decode it and Pillow names it."""
    whole = picture_bytes(rng, 40, 30, "JPEG")
    table = whole.index(b"\xff\xc4") + 5  # the marker, its length and the table's class and id
    return whole[:table] + b"\xff" * 16 + whole[table + 16:]


def test_jpegs_left_to_the_explain_actor_explain_as_in_the_fetch(tmp_path, rng) -> None:
    """FetchImages(decode_jpegs=False) checks JPEGs and passes their bytes on; ExplainPairs decodes
    them on its device (torchvision: nvJPEG on a GPU, here the CPU). The rows are those of a fetch that
    decodes, failures included (one found only by the actor), within the decoders' grey level."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=4, bad_rows=True, fmt="JPEG")
    (tmp_path / "img" / "huffman.jpg").write_bytes(bogus_huffman_table_jpeg(rng))
    rows.append({**rows[0], "pair_id": "bad/huffman", "reference_uri": "img/huffman.jpg"})
    # the reference fails in the fetch, the query in the actor: the query's error still comes first
    rows.append({**rows[0], "pair_id": "bad/both", "query_uri": "img/huffman.jpg", "reference_uri": "img/nowhere.jpg"})
    table = manifest_table(rows)
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    in_fetch = FetchImages(root, spec.input_size, 2_000_000, options)(table)
    left = FetchImages(root, spec.input_size, 2_000_000, options, decode_jpegs=False)(table)
    ok = pc.equal(left.column("status"), "ok")
    assert left.filter(ok).column("_query_pixels").null_count == left.filter(ok).num_rows  # all left as bytes
    assert left.column("status").to_pylist().count("error") == 4  # missing files, and two found in their headers
    explain = ExplainPairs(spec, options, "a1", 2_000_000)
    explained = [explain(batch) for batch in (in_fetch, left)]
    assert explained[0].column_names == explained[1].column_names
    for name in ("pair_id", "status", "error"):
        assert explained[0].column(name).to_pylist() == explained[1].column(name).to_pylist(), name
    errors = dict(zip(explained[1].column("pair_id").to_pylist(), explained[1].column("error").to_pylist()))
    assert errors["bad/huffman"].startswith("reference: img/huffman.jpg: ")
    assert errors["bad/both"].startswith("query: img/huffman.jpg: ") and "; reference: img/nowhere.jpg: " in errors["bad/both"]
    similarities = [np.array(table.column("similarity").to_pylist(), dtype=float) for table in explained]
    np.testing.assert_allclose(*similarities, atol=2e-3)  # the decoders differ by 3e-4; the rows span 0.017
    layout = RunLayout(str(tmp_path / "out"), "r1", "2026-11-26", "a1")
    rendered = RenderResults(layout, "all", FlagRules(), options)(explained[1])
    assert all(rendered.filter(pc.equal(rendered.column("status"), "ok")).column("png_uri").to_pylist())


def test_a_jpeg_larger_than_its_pictures_is_decoded_in_the_fetch(tmp_path, rng) -> None:
    """Left encoded, a large file would cross the object store once per row that holds it."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=1, top_k=2, fmt="JPEG")
    noise = rng.integers(0, 256, (600, 500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "img" / "noise.jpg", quality=95)
    rows.append({**rows[0], "pair_id": "large", "reference_uri": "img/noise.jpg"})
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    fetch = FetchImages(root, spec.input_size, 2_000_000, options, decode_jpegs=False)
    assert (tmp_path / "img" / "noise.jpg").stat().st_size > fetch.max_passed_jpeg_bytes
    fetched = fetch(manifest_table(rows))
    passed = fetched.column("_reference_jpeg").is_valid().to_pylist()
    assert passed == [pair_id != "large" for pair_id in fetched.column("pair_id").to_pylist()]
    assert fetched.column("_reference_pixels").is_valid().to_pylist() == [not p for p in passed]


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",  # torch's allocator: torch.cuda.OutOfMemoryError
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
], ids=["allocator", "cublas", "cublas-handle", "cudnn"])
def test_a_batch_the_device_cannot_hold_is_explained_in_pieces(message, tmp_path, rng, caplog, monkeypatch) -> None:
    """Several replicas share a GPU, so a batch may not fit its memory: the actor halves it (and the
    batches after it) until it fits, with the same results, and tries twice the size again after
    REGROW_AFTER batches that fill the smaller pieces. The device is played here by an explainer
    that runs out of memory above `limit` pairs, as torch's allocator, cuBLAS or cuDNN says it;
    the splitting, merging and sizing are real."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=3, top_k=4)
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    fetched = FetchImages(root, spec.input_size, 2_000_000, options)(pq.read_table(manifest))
    whole = ExplainPairs(spec, options, "a1", 2_000_000)(fetched)

    def out_of_memory() -> RuntimeError:
        return (torch.cuda.OutOfMemoryError if message.startswith("CUDA out of memory") else RuntimeError)(message)

    monkeypatch.setattr(explain_stage, "REGROW_AFTER", 2)
    explain = ExplainPairs(spec, options, "a1", 2_000_000)
    explain_pairs = explain.explainer.explain_pairs
    forwarded: list[int] = []  # pairs per pass that fitted
    limit = [3]  # pairs the device holds

    def with_little_memory(pixels, query_slots, reference_slots):
        if len(query_slots) > limit[0]:
            raise out_of_memory()
        forwarded.append(len(query_slots))
        return explain_pairs(pixels, query_slots, reference_slots)

    def explain_batch(expected_max_pairs: int, rows: int = fetched.num_rows) -> str:
        """Explains the first `rows` rows as one batch; what the actor logged."""
        caplog.clear()
        with caplog.at_level("INFO", logger="sfam.audit"):
            explained = explain(fetched.slice(0, rows))
        assert explain.max_pairs == expected_max_pairs
        np.testing.assert_allclose(explained.column("similarity").to_numpy(),
                                   whole.column("similarity").to_numpy()[:rows], rtol=1e-5, atol=1e-6)
        return caplog.text

    explain.explainer.explain_pairs = with_little_memory
    with caplog.at_level("WARNING", logger="sfam.audit"):
        pieces = explain(fetched)
    assert f"ran out of memory explaining 12 pairs at once ({message}): now at most 6" in caplog.text
    assert "explaining 6 pairs at once (" in caplog.text
    assert "now at most 3 at a time (twice that again after 2 batches that fill them)" in caplog.text
    assert explain.max_pairs == 3 and forwarded == [3, 3, 3, 3]
    assert pieces.column("status").to_pylist() == whole.column("status").to_pylist()
    for name in ("similarity", "residual_query", "residual_reference"):
        np.testing.assert_allclose(pieces.column(name).to_numpy(), whole.column(name).to_numpy(), rtol=1e-5, atol=1e-6)
    for name in ("cis_query", "map_reference"):
        np.testing.assert_allclose(np.stack(pieces.column(name).to_numpy(zero_copy_only=False)).astype(np.float64),
                                   np.stack(whole.column(name).to_numpy(zero_copy_only=False)).astype(np.float64),
                                   rtol=1e-3, atol=1e-4)
    assert pieces.column("query_peak_xy").to_pylist() == whole.column("query_peak_xy").to_pylist()

    assert "ran out of memory" not in explain_batch(3)  # the next batch starts at the size that fitted: 1 of 2
    all_failed = fetched.set_column(fetched.schema.get_field_index("status"), "status",
                                    pa.array(["error"] * fetched.num_rows))
    for tail in (fetched.slice(0, 2), fetched.slice(0, 2), all_failed):  # fill no piece of 3: not counted
        explain(tail)
    assert (explain.max_pairs, explain.fitted_batches) == (3, 1)
    # the second batch that fills them: twice the size next time, not a whole batch of 4 (the largest had 12)
    assert "tries 6 pairs at once again" in explain_batch(6, rows=4)
    # still too large: halved again, and the next try waits twice as long
    assert "explaining 6 pairs at once (" in (log := explain_batch(3)) and "twice that again after 4 batches" in log
    limit[0] = 100  # the replica beside it gave its memory back
    for _ in range(3):
        explain_batch(3)
    assert "tries 6 pairs at once again" in explain_batch(6)
    explain_batch(6)  # it fits: the wait is back to 2 batches
    assert "tries whole batches at once again" in explain_batch(sys.maxsize)  # 12 pairs: the largest batch
    forwarded.clear()
    explain_batch(sys.maxsize)
    assert forwarded == [12]
    limit[0] = 3  # whole batches fitted before running out: not a regrow that failed, so the wait stays 2
    assert "now at most 3 at a time (twice that again after 2 batches" in explain_batch(3)

    explain.explainer.explain_pairs = lambda *_: (_ for _ in ()).throw(RuntimeError("mat1 and mat2 shapes differ"))
    with pytest.raises(RuntimeError, match="mat1"):  # not a matter of memory: the batch fails at once
        explain(fetched)
    assert explain.max_pairs == 3  # unchanged
    explain.explainer.explain_pairs = lambda *_: (_ for _ in ()).throw(out_of_memory())
    with pytest.raises(RuntimeError, match=re.escape(message)):  # not even one pair fits: the batch fails, as before
        explain(fetched)


def test_matched_weighting_writes_correspondences_in_image_pixels(tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=2, top_k=3)
    spec = ModelSpec.model_validate({**model_config(join_uri(root, "model.pt")), "weighting": "matched"})
    fetched = FetchImages(root, spec.input_size, 2_000_000, options)(pq.read_table(manifest))
    explained = ExplainPairs(spec, options, "a1", 2_000_000)(fetched)
    ok = explained.filter(pc.equal(explained.column("status"), "ok"))
    assert ok.num_rows > 0 and explained.schema.field("correspondences").type == result_type("correspondences")
    for row in ok.to_pylist():
        assert 1 <= len(row["correspondences"]) <= 5
        scores = [match["score"] for match in row["correspondences"]]
        assert all(-1.0 - 1e-6 <= score <= 1.0 + 1e-6 for score in scores)
        for side in ("query", "reference"):
            width, height = row[f"_{side}_size"]
            assert all(0 < m[f"{side}_xy"][0] < width and 0 < m[f"{side}_xy"][1] < height for m in row["correspondences"])
    layout = RunLayout(str(tmp_path / "out"), "r1", "2026-11-26", "a1")
    rendered = RenderResults(layout, "all", FlagRules(), options)(explained)
    assert all(uri for uri in rendered.filter(pc.equal(rendered.column("status"), "ok")).column("png_uri").to_pylist())
    plain = ExplainPairs(ModelSpec.model_validate(model_config(join_uri(root, "model.pt"))), options, "a1",
                         2_000_000)(fetched)
    assert plain.column("correspondences").null_count == plain.num_rows


def test_maps_are_stored_at_any_scale_of_similarity(tmp_path, rng) -> None:
    """A dot-product model's `partner` maps are in the similarity's units (c^2 for embeddings scaled by
    c): stored as they are, beyond float16's range (6e-8 to 65504) too, not as inf or zeros."""
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=1, top_k=3)
    stored = {}
    for scale in (1e-4, 1.0, 1e4):
        with torch.no_grad():
            scaled = {name: value * scale if name.startswith("fc.") else value for name, value in model.state_dict().items()}
        torch.save(scaled, tmp_path / f"model-{scale:g}.pt")
        spec = ModelSpec.model_validate({**model_config(str(tmp_path / f"model-{scale:g}.pt")), "metric": "dot",
                                        "weighting": "partner"})
        fetched = FetchImages(root, spec.input_size, 2_000_000, options)(pq.read_table(manifest))
        explained = ExplainPairs(spec, options, "a1", 2_000_000)(fetched)
        assert explained.schema.field("map_query").type == result_type("map_query")
        stored[scale] = {side: np.array(explained.column(f"map_{side}").to_pylist(), np.float64) for side in SIDES}
    assert all(np.isfinite(maps).all() for maps in stored[1e4].values())
    assert abs(stored[1e4]["query"]).max() > 1e5 and 0 < abs(stored[1e-4]["query"]).max() < 1e-5  # float16 would fail
    for side in SIDES:
        np.testing.assert_allclose(stored[1e4][side] / 1e8, stored[1.0][side], rtol=1e-4, atol=1e-6 * abs(stored[1.0][side]).max())
        np.testing.assert_allclose(stored[1e-4][side] * 1e8, stored[1.0][side], rtol=1e-4, atol=1e-6 * abs(stored[1.0][side]).max())


# Fetches a normal image, then the bomb, in a fresh process; prints the bomb's error and how far the process's
# RSS rose above its RSS before the bomb (sampled every 2 ms: the peak-RSS counter also holds import-time peaks)
def test_a_16_bit_png_within_the_pixel_limit_is_read(tmp_path, rng) -> None:
    """Its file holds more bytes than pixels x 4 (6 a pixel, noise): the size guard allows it."""
    width, height = 1000, 800
    data = noise_png_16_bits(rng, width, height)
    assert len(data) > 4 * width * height + (1 << 20)
    (tmp_path / "deep.png").write_bytes(data)
    pq.write_table(manifest_table([{"pair_id": "deep", "query_uri": "deep.png", "reference_uri": "deep.png"}]),
                   tmp_path / "pairs.parquet")
    fetched = FetchImages(str(tmp_path), 32, width * height, StorageOptions())(pq.read_table(tmp_path / "pairs.parquet"))
    assert fetched.column("status").to_pylist() == ["ok"], fetched.column("error").to_pylist()


PEAK_MEMORY_OF_BOMB = """
import sys, threading, time
import psutil
import pyarrow.parquet as pq
from pipeline.distributed.fetch import FetchImages
from pipeline.io.storage import StorageOptions
root, max_pixels = sys.argv[1], int(sys.argv[2])
table = pq.read_table(root + "/pairs.parquet")
fetch = FetchImages(root, 64, max_pixels, StorageOptions())
fetch(table.slice(0, 1))
process, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)
before = process.memory_info().rss
sampler = threading.Thread(target=sample)
sampler.start()
error = fetch(table.slice(1, 1)).column("error")[0].as_py()
done.set()
sampler.join()
print(error)
print(max(0, peak[0] - before) // (1 << 20))
"""


def test_a_decompression_bomb_fails_its_row_in_bounded_memory(tmp_path, rng) -> None:
    """A valid 12000x12000 PNG (420 KB; about 600 MB once Pillow decodes it, which Pillow alone allows)."""
    (tmp_path / "normal.png").write_bytes(picture_bytes(rng, 80, 60))
    (tmp_path / "bomb.png").write_bytes(black_png(12000, 12000))
    rows = [{"pair_id": "normal", "query_uri": "normal.png", "reference_uri": "normal.png"},
            {"pair_id": "bomb", "query_uri": "normal.png", "reference_uri": "bomb.png"}]
    pq.write_table(manifest_table(rows), tmp_path / "pairs.parquet")

    def peak_growth(max_pixels: int) -> tuple[str | None, int]:
        child = subprocess.run([sys.executable, "-c", PEAK_MEMORY_OF_BOMB, str(tmp_path), str(max_pixels)],
                               capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert child.returncode == 0, child.stderr
        lines = child.stdout.split("\n")
        return (None if lines[0] == "None" else lines[0]), int(lines[1])

    error, growth_mib = peak_growth(50_000_000)  # the default max_image_pixels
    assert "too many pixels: 12000x12000" in error and growth_mib < 32, growth_mib
    error, growth_mib = peak_growth(200_000_000)  # the measurement sees a decode when one happens:
    assert error is None and growth_mib > 100, growth_mib  # a decode takes hundreds of MiB, a refusal under 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decode_jpegs", [True, False], ids=["pillow", "nvjpeg"])
def test_explain_actor_on_gpu_matches_cpu(decode_jpegs: bool, tmp_path, rng) -> None:
    """On the GPU, with the JPEGs decoded by the fetch (Pillow) or by the actor (nvJPEG): the similarities
    of the API on the CPU, within float32 (Pillow) or the decoders' grey level (nvJPEG)."""
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=3, top_k=4, fmt="JPEG")
    spec = ModelSpec.model_validate(model_config(join_uri(root, "model.pt")))
    explain = ExplainPairs(spec, options, "a1", 2_000_000)
    assert next(explain.explainer.sfam.model.parameters()).device.type == "cuda"
    assert explain.decoder.device.type == "cuda"  # this torchvision decodes JPEGs there
    fetched = FetchImages(root, spec.input_size, 2_000_000, options, decode_jpegs=decode_jpegs)(pq.read_table(manifest))
    explained = explain(fetched)
    expected = expected_similarities(model, rows, root, options)  # on the CPU
    tolerance = 1e-3 if decode_jpegs else 2e-2
    for pair_id, similarity in zip(explained.column("pair_id").to_pylist(), explained.column("similarity").to_pylist()):
        assert abs(similarity - expected[pair_id]) < tolerance, pair_id
