"""The audit job on a real local Ray, over local folders and over moto's S3 server."""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torchvision
from PIL import Image

from pipeline.config import ConfigError, JobConfig
from pipeline.distributed.job import run_audit
from pipeline.distributed.preflight import preflight
from pipeline.distributed.resources import decodes_jpegs_in_actors
from pipeline.errors import AuditFailed
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import (
    StorageError,
    StorageOptions,
    exists,
    glob,
    join_uri,
    parent_uri,
    read_bytes,
    remove_tree,
    resolve_uri,
    write_bytes,
)
from pipeline.io.stores import open_results_store
from pipeline.io.tables import read_json
from pipeline.layout import RunLayout
from pipeline.overlays import ImageChanged, PairNotFound, render_pair_of_run
from pipeline.reporting import write_report
from pipeline.schema import SIDES

from audit_data import expected_similarities, job_config, manifest_table, write_audit, write_table, write_weights

pytestmark = pytest.mark.timeout(300)


def check_run(config: JobConfig, rows: list[dict], model, root: str) -> None:
    options = config.storage_options
    table = HiveParquetStore(config.output, options).read(run_id=config.run_id)
    assert sorted(table.column("pair_id").to_pylist()) == sorted(r["pair_id"] for r in rows)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    expected = expected_similarities(model, [r for r in rows if not r["pair_id"].startswith("bad/")], root, options)
    assert ok.num_rows == len(expected)
    for pair_id, similarity in zip(ok.column("pair_id").to_pylist(), ok.column("similarity").to_pylist()):
        assert abs(similarity - expected[pair_id]) < 1e-4, pair_id
    assert ok.column("team").to_pylist() == ["search"] * ok.num_rows  # passed through
    first = ok.slice(0, 1).to_pylist()[0]
    assert len(first["cis_query"]) == 512 and len(first["map_query"]) == np.prod(first["map_shape"])
    for side in SIDES:  # the bytes the run read, as sha256sum gives them
        image = read_bytes(resolve_uri(first[f"{side}_uri"], parent_uri(config.manifest)), options)
        assert first[f"{side}_sha256"] == hashlib.sha256(image).hexdigest()
    assert 0 <= first["query_energy_in_box"] <= 1 and isinstance(first["query_pointing_hit"], bool)
    for png in ok.column("png_uri").to_pylist():
        if config.render_png == "all" or png is not None:
            assert read_bytes(png, options)[:8] == b"\x89PNG\r\n\x1a\n"
    record = read_json(join_uri(config.output, "runs", config.run_id, "run.json"), options)
    # the replicas were pinned to the weights that were checked and recorded
    assert record["weights_sha256"] and record["config"]["model"]["weights_sha256"] == record["weights_sha256"]
    assert record["counts"]["pairs"] == len(rows)
    assert {"torch", "torchvision", "timm", "safetensors"} <= {name for name, found in record["versions"].items() if found}
    # 3 queries x top-4 in batches of 8: at most 4 + 3 distinct images per batch of 8 pairs
    assert record["forward_passes_per_pair"] < 1.6
    # files of rows_per_file rows, not one per batch
    parts = glob(join_uri(config.output, "results", "run_date=*", f"run_id={config.run_id}", "*.parquet"), options,
                 under=config.output)
    assert 1 <= len(parts) <= math.ceil(len(rows) / config.rows_per_file)


def test_local_folder_run_with_bad_rows(local_ray, tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, bad_rows=True)
    config = job_config(root, options, manifest, "local-1", max_error_fraction=0.5)
    summary = run_audit(config)
    assert (summary.pairs, summary.error) == (len(rows), 3)
    check_run(config, rows, model, root)
    table = HiveParquetStore(config.output, options).read(run_id="local-1")
    errors = dict(zip(table.column("pair_id").to_pylist(), table.column("error").to_pylist()))
    # each names the image as the manifest has it; a missing one also where the relative path led
    assert errors["bad/missing"] == f"reference: img/nowhere.png: not found (at {join_uri(root, 'img', 'nowhere.png')})"
    assert errors["bad/corrupt"].startswith("reference: img/corrupt.jpg: ") and "corrupt" in errors["bad/corrupt"]
    assert "too many pixels" in errors["bad/bomb"]
    digests = {row["pair_id"]: (row["query_sha256"], row["reference_sha256"]) for row in table.to_pylist()}
    assert digests["bad/corrupt"][0] and digests["bad/corrupt"][1] is None  # none of a file that is no image
    assert exists(join_uri(config.output, "runs", "local-1", "_SUCCESS"), options)

    # render_png: flagged (the default) drew some pairs; any other is drawn later from the table
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    drawn = [uri for uri in ok.column("png_uri").to_pylist() if uri]
    left_out = [pid for pid, uri in zip(ok.column("pair_id").to_pylist(), ok.column("png_uri").to_pylist()) if not uri]
    assert 0 < len(drawn) < ok.num_rows and left_out
    png = render_pair_of_run(config.output, "local-1", left_out[0], options)
    assert Image.open(io.BytesIO(png)).size[0] > 256 and png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PairNotFound, match="bad/missing"):
        render_pair_of_run(config.output, "local-1", "bad/missing", options)
    reference = os.path.join(os.path.dirname(manifest), ok.filter(pc.equal(ok.column("pair_id"), left_out[0]))
                             .column("reference_uri")[0].as_py())
    os.rename(reference, reference + ".moved")
    with pytest.raises(StorageError, match=r": not found \(sfam render reads the pair's images again"):
        render_pair_of_run(config.output, "local-1", left_out[0], options)
    os.rename(reference + ".moved", reference)
    original = Path(reference).read_bytes()
    Path(reference).write_bytes(original + b"\0")  # still decodes, but it is not the picture the run explained
    with pytest.raises(ImageChanged, match=r"the reference image .* has changed since the run read it"):
        render_pair_of_run(config.output, "local-1", left_out[0], options)
    Path(reference).write_bytes(original)
    for _ in range(3):  # the command exits 2, also right after reading the table (it aborted in Arrow's threads)
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", config.output, "--run-id", "local-1",
                               "--pair-id", "bad/missing", "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: pair 'bad/missing'"), done.stderr
    # a standard output whose reader has gone (`| head -c 8` that finished), for a large output (the PNG) and
    # a small one that stays in Python's buffer until the end: quietly, exit 141 as a SIGPIPE
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    for command in (["render", config.output, "--run-id", "local-1", "--pair-id", left_out[0], "-o", "-"],
                    ["report", config.output, "--run-id", "local-1", "--out", str(tmp_path / "report.html")]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env)
        os.close(write_end)
        assert done.returncode == 141 and "Traceback" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr


def test_relative_paths_lead_every_worker_to_the_same_files(local_ray, tmp_path, rng, monkeypatch) -> None:
    """Relative manifest, output and weights are read from the driver's current directory, which
    is not the Ray workers' (they started elsewhere, with the module's Ray)."""
    options = StorageOptions()
    root = str(tmp_path / "audit")
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=1, top_k=3)
    monkeypatch.chdir(tmp_path)
    given = job_config(root, options, manifest, "relative").model_dump()
    config = JobConfig.model_validate({
        **given, "manifest": manifest.removeprefix(f"{tmp_path}/"), "output": "audit/audits",
        "model": {**given["model"], "weights": "audit/models/model.pt"}})
    assert (config.manifest, config.model.weights) == (manifest, join_uri(root, "models", "model.pt"))
    summary = run_audit(config)
    assert (summary.pairs, summary.error) == (len(rows), 0)
    monkeypatch.chdir(tmp_path / "audit")  # elsewhere: the run is found where it was written
    png = render_pair_of_run(config.output, "relative", rows[0]["pair_id"], options)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_input_of_height_by_width(local_ray, tmp_path, rng) -> None:
    """A re-ID model's 64 x 32 px input ([height, width]): every image is squeezed to it, the maps
    keep its aspect (2 x 1 cells at resnet18's stride of 32), and `sfam render` draws a pair from the table."""
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=3)
    given = job_config(root, options, manifest, "tall").model_dump()
    config = JobConfig.model_validate({**given, "model": {**given["model"], "input_size": [64, 32]}})
    assert run_audit(config).ok == len(rows)
    table = HiveParquetStore(config.output, options).read(run_id="tall")
    expected = expected_similarities(model, rows, root, options, input_size=(64, 32))
    for pair_id, similarity in zip(table.column("pair_id").to_pylist(), table.column("similarity").to_pylist()):
        assert abs(similarity - expected[pair_id]) < 1e-4, pair_id
    assert set(map(tuple, table.column("map_shape").to_pylist())) == {(2, 1)}
    png = render_pair_of_run(config.output, "tall", rows[0]["pair_id"], options)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_jpegs_decoded_by_torchvision_in_the_actors(local_ray, tmp_path, rng) -> None:
    """jpeg_decoder: torchvision (the default beside GPUs, where it is nvJPEG) gives the rows of the
    API in-process, within the decoders' grey level, and fails the rows of bad files."""
    root, options = str(tmp_path), StorageOptions()
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, bad_rows=True, fmt="JPEG")
    config = job_config(root, options, manifest, "torchvision", jpeg_decoder="torchvision", max_error_fraction=0.5)
    summary = run_audit(config)
    assert (summary.pairs, summary.error) == (len(rows), 3)
    table = HiveParquetStore(config.output, options).read(run_id="torchvision")
    expected = expected_similarities(model, [row for row in rows if not row["pair_id"].startswith("bad/")], root, options)
    got = dict(zip(table.column("pair_id").to_pylist(), table.column("similarity").to_pylist()))
    assert all(abs(got[pair_id] - similarity) < 2e-2 for pair_id, similarity in expected.items())
    errors = dict(zip(table.column("pair_id").to_pylist(), table.column("error").to_pylist()))
    assert errors["bad/corrupt"].startswith("reference: img/corrupt.jpg: ")


def test_a_torchvision_without_its_jpeg_decoder_leaves_jpegs_to_pillow(tmp_path, rng, monkeypatch) -> None:
    """torchvision deprecated its decoders for TorchCodec: once they are gone, `auto` decodes with
    Pillow beside GPUs too, and `torchvision` is refused before any work."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, fmt="JPEG")
    config = job_config(root, options, manifest, "gone", jpeg_decoder="torchvision")
    automatic = config.model_copy(update={"jpeg_decoder": "auto"})
    assert decodes_jpegs_in_actors(automatic, gpus=1.0)
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    assert not decodes_jpegs_in_actors(automatic, gpus=1.0)
    with pytest.raises(ConfigError, match=r"^jpeg_decoder: torchvision \S+ no longer decodes JPEGs; use auto or pillow$"):
        preflight(config, open_results_store(config.output, options))


def test_s3_run_and_rerun_has_no_duplicates(local_ray, s3_bucket, rng, tmp_path) -> None:
    bucket, options = s3_bucket
    root = f"s3://{bucket}/audit"
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng)
    config = job_config(root, options, manifest, "nightly-1", render_png=True)
    run_audit(config)
    check_run(config, rows, model, root)
    stale = write_report(config.output, "nightly-1", options)  # at its default place, beside the run
    run_audit(config)  # the same run_id again
    assert not exists(stale, options)  # it showed the replaced attempt's overlays
    table = HiveParquetStore(config.output, options).read(run_id="nightly-1")
    assert table.num_rows == len(rows)
    assert len(set(table.column("pair_id").to_pylist())) == len(rows)

    # a report written locally for the run on S3 shows its overlays offline: they are copied next to it
    local = tmp_path / "report.html"
    write_report(config.output, "nightly-1", options, str(local))
    copies = sorted((tmp_path / "report_overlays").glob("*.png"))
    assert len(copies) == len(rows) and all(c.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for c in copies)
    assert f'src="report_overlays/{copies[0].name}"' in local.read_text()


def test_a_folder_manifest_on_s3(local_ray, s3_bucket, rng) -> None:
    """A manifest written as Spark or Athena write a partitioned table: part files (one without an
    extension) in Hive folders (`label=1/`, null as `__HIVE_DEFAULT_PARTITION__`) beside a _SUCCESS
    marker; the folder names are a column of the results, and relative URIs are read from the
    folder that holds the table."""
    bucket, options = s3_bucket
    root = f"s3://{bucket}/folder-audit"
    write_weights(join_uri(root, "models", "model.pt"), options)
    _, rows = write_audit(root, options, rng, queries=2, top_k=3)
    labels = [None, 1, 0, 1, 0, 0]
    folder = join_uri(root, "pairs-export")
    table = manifest_table(rows).drop_columns(["label"])  # partitionBy("label") leaves it out of the files
    part_files = {None: "label=__HIVE_DEFAULT_PARTITION__/part-00000.snappy.parquet",
                  1: "label=1/part-00001.snappy.parquet", 0: "label=0/20261127_120000_00001_abcde"}
    for label, name in part_files.items():
        write_table(join_uri(folder, name), table.filter(pa.array([value == label for value in labels])), options)
    write_bytes(join_uri(folder, "_SUCCESS"), b"", options)
    summary = run_audit(job_config(root, options, folder, "folder", render_png=False))
    assert (summary.pairs, summary.error) == (len(rows), 0)
    read = HiveParquetStore(join_uri(root, "audits"), options).read(run_id="folder", columns=["pair_id", "label", "team"])
    assert read.schema.field("label").type == pa.int64()  # folder values that are all integers
    assert sorted(read.to_pylist(), key=lambda row: row["pair_id"]) == sorted(
        ({"pair_id": row["pair_id"], "label": label, "team": "search"} for row, label in zip(rows, labels)),
        key=lambda row: row["pair_id"])


def test_too_many_bad_rows_fail_without_success_marker(local_ray, tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=1, top_k=2, bad_rows=True)
    config = job_config(root, options, manifest, "failing", max_error_fraction=0.1, render_png=False)
    with pytest.raises(AuditFailed, match="3 of 5 pairs failed"):
        run_audit(config)
    layout = RunLayout(config.output, "failing", "unused", "unused")
    record = read_json(layout.run_record, options)
    assert record["status"] == "failed"
    assert not exists(layout.success_marker, options)
    report = read_bytes(write_report(config.output, "failing", options), options).decode()
    assert "This run failed" in report and report.count('<article class="card ') >= 5  # its 5 rows (some twice), kept
    # an attempt that an error ended has no rows left: its report says why, with none
    remove_tree(RunLayout(config.output, "failing", record["run_date"], record["attempt"]).staged_results_dir, options)
    report = read_bytes(write_report(config.output, "failing", options), options).decode()
    assert "This run failed" in report and '<article class="card ' not in report
    # re-run and committed, the run keeps the failed attempt's start as when it first ran (its place among the nights)
    run_audit(config.model_copy(update={"max_error_fraction": 1.0}))
    committed = read_json(layout.run_record, options)
    assert committed["status"] == "succeeded" and committed["attempt"] != record["attempt"]
    assert committed["timings"]["first_started"] == record["timings"]["started"] < committed["timings"]["started"]


def test_a_box_wholly_outside_its_image_has_no_localisation_and_is_named(local_ray, tmp_path, rng) -> None:
    """Boxes in other pixels (of a resized copy, say) would score as misses: they are null and warned of."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=1, top_k=4)
    table = pq.read_table(manifest)
    boxes = table.column("query_bbox").to_pylist()
    boxes[1] = [5000.0, 5000.0, 5100.0, 5100.0]
    pq.write_table(table.set_column(table.schema.get_field_index("query_bbox"), "query_bbox",
                                    pa.array(boxes, table.schema.field("query_bbox").type)), manifest)
    config = job_config(root, options, manifest, "boxes", render_png="none", num_actors=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_audit(config)
    # one batch, two actors: one write task, so Ray Data has no idle one to warn of
    assert not [w for w in caught if "concurrent tasks for 'Write'" in str(w.message)]
    results = {r["pair_id"]: r for r in HiveParquetStore(config.output, options).read(run_id="boxes").to_pylist()}
    outside = results[rows[1]["pair_id"]]
    assert (outside["query_energy_in_box"], outside["query_pointing_hit"]) == (None, None)
    assert outside["reference_energy_in_box"] is not None and outside["status"] == "ok"
    assert all(results[r["pair_id"]]["query_energy_in_box"] is not None for r in rows if r is not rows[1])
    warning = f"boxes wholly outside their image (1 query, 0 reference, of {len(rows)} ok pairs)"
    assert [w for w in summary.warnings if w.startswith(warning)], summary.warnings
    record = read_json(join_uri(config.output, "runs", "boxes", "run.json"), options)
    assert [w for w in record["warnings"] if w.startswith(warning)]
