"""The Iceberg table end to end: moto's S3 as the warehouse, a SQLite catalog, real runs on a local Ray.

A reader runs queries in a loop while a re-run commits: each query sees the old run or the
new one, never a mix. A new manifest column evolves the table's schema.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, JobConfig, validated
from pipeline.distributed.iceberg_commit import overwrite_run
from pipeline.distributed.job import run_audit
from pipeline.errors import UserError
from pipeline.io.iceberg_store import IcebergStore, TableConfig, catalog_properties
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageError, StorageOptions, exists, join_uri
from pipeline.io.stores import open_results_store
from pipeline.io.tables import read_json, write_json
from pipeline.reporting import write_report

from audit_data import job_config, manifest_table, write_audit, write_table, write_weights

pytestmark = pytest.mark.timeout(600)


def iceberg_config(root: str, options: StorageOptions, manifest: str, run_id: str, catalog_db: str) -> JobConfig:
    table = {"format": "iceberg", "identifier": "audits.results",
             "catalog": {"type": "sql", "uri": f"sqlite:///{catalog_db}", "warehouse": f"{root}/warehouse"}}
    return job_config(root, options, manifest, run_id, table=table, render_png="none")


def test_iceberg_runs_reruns_and_a_reader_that_never_sees_a_mix(local_ray, s3_bucket, rng, tmp_path, capfd) -> None:
    bucket, options = s3_bucket
    root = f"s3://{bucket}/audit"
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=4, top_k=4)
    catalog_db = str(tmp_path / "catalog.db")
    first = iceberg_config(root, options, manifest, "nightly-1", catalog_db)
    summary = run_audit(first)
    assert "Parquet dataset sampling" not in capfd.readouterr().err  # the commit's read of the staged rows is quiet
    assert summary.results == "Iceberg table audits.results, run_id = nightly-1"  # not a Hive folder that is never made
    assert read_json(join_uri(first.output, "runs", "nightly-1", "_SUCCESS"), options)["results"] == summary.results
    committed = read_json(join_uri(first.output, "runs", "nightly-1", "_SUCCESS"), options)["attempt"]
    assert not exists(join_uri(first.output, "runs", "nightly-1", "attempts", committed, "results"), options)  # no 2nd copy
    run_audit(iceberg_config(root, options, manifest, "nightly-2", catalog_db))
    store = open_results_store(first.output, options, first.table)
    assert store.read(run_id="nightly-1").num_rows == len(rows) == store.read(run_id="nightly-2").num_rows
    with pytest.raises(StorageError, match="in an Iceberg table .* read here as a Hive table: give the job's config"):
        HiveParquetStore(first.output, options).read(run_id="nightly-1")  # `sfam compare OUTPUT ...` without --config
    # and the reverse: a run of the Hive era, read through a config that names the Iceberg table
    hive_era = {"run_id": "hive-era", "attempt": "a1", "status": "succeeded", "config": {"table": {"format": "hive"}}}
    write_json(join_uri(first.output, "runs", "hive-era", "run.json"), hive_era, options)
    write_json(join_uri(first.output, "runs", "hive-era", "_SUCCESS"), {"attempt": "a1"}, options)
    with pytest.raises(StorageError, match="runs/hive-era: no rows in the Iceberg table audits.results; the run's record "
                                           "says table.format: hive"):
        store.read(run_id="hive-era")
    old_attempt = read_json(join_uri(first.output, "runs", "nightly-1", "_SUCCESS"), options)["attempt"]

    # the manifest gains a column; the re-run of nightly-1 must evolve the schema, not split the table
    grown = manifest_table(rows)
    write_table(manifest, grown.append_column("reviewer", pa.array(["ana"] * grown.num_rows)), options)

    seen: list[tuple[int, frozenset]] = []
    stop = threading.Event()

    def reader() -> None:
        reading = open_results_store(first.output, options, first.table)
        while not stop.is_set():
            table = reading.read(run_id="nightly-1", columns=["pair_id", "attempt"])
            seen.append((table.num_rows, frozenset(pc.unique(table.column("attempt")).to_pylist())))
            time.sleep(0.02)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        run_audit(first)
        committed_at = len(seen)
        deadline = time.monotonic() + 60
        while (len(seen) < committed_at + 3 or len(seen) < 10) and time.monotonic() < deadline:  # and after the commit
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    new_attempt = read_json(join_uri(first.output, "runs", "nightly-1", "_SUCCESS"), options)["attempt"]
    print(f"reader: {len(seen)} queries; rows seen per query: {sorted({n for n, _ in seen})}; "
          f"before the commit {sum(a == {old_attempt} for _, a in seen)}, after {sum(a == {new_attempt} for _, a in seen)}")
    assert len(seen) >= 10
    assert all(n == len(rows) and len(attempts) == 1 for n, attempts in seen)  # never a mix, never partial
    assert {frozenset({old_attempt}), frozenset({new_attempt})} == {a for _, a in seen}
    rerun = store.read(run_id="nightly-1")
    assert rerun.num_rows == len(rows) and set(rerun.column("reviewer").to_pylist()) == {"ana"}
    other = store.read(run_id="nightly-2")
    assert "reviewer" in other.column_names and set(other.column("reviewer").to_pylist()) == {None}
    assert store.catalog().load_table("audits.results").spec().fields[0].name == "run_id"
    page = tmp_path / "report.html"
    write_report(first.output, "nightly-1", options, str(page), first.table)  # the report reads the Iceberg table
    assert page.read_text().count('class="card') >= len(rows)
    without_config = tmp_path / "without-config.html"  # the run's record names its table
    assert main(["report", first.output, "--run-id", "nightly-1", "--endpoint-url", options.endpoint_url,
                 "-o", str(without_config)]) == 0
    assert without_config.read_text().count('class="card') == page.read_text().count('class="card')

    # an attempt stopped after its snapshot, before its _SUCCESS: the run is still the committed attempt's,
    # read from the snapshot that holds it
    write_json(join_uri(first.output, "runs", "nightly-1", "_SUCCESS"), {"attempt": old_attempt}, options)
    kept = store.read(run_id="nightly-1", columns=["pair_id", "attempt", "reviewer"])
    assert kept.num_rows == len(rows) and set(kept.column("attempt").to_pylist()) == {old_attempt}
    assert "reviewer" not in kept.column_names  # the columns of its own snapshot


def test_catalog_defaults_and_refusals() -> None:
    local = catalog_properties(TableConfig(format="iceberg"), "/data/audits", StorageOptions())
    assert local["uri"] == "sqlite:////data/audits/iceberg/catalog.db" and local["warehouse"].startswith("file:///data")
    with pytest.raises(UserError, match="embedded SQLite catalog needs a local output"):
        catalog_properties(TableConfig(format="iceberg"), "s3://bucket/audits", StorageOptions())
    for secret in ("s3.secret-access-key", "adls.account-key", "adls.connection-string", "header.Authorization"):
        with pytest.raises(ValueError, match=f"{secret}: credentials never go into the config"):
            TableConfig(format="iceberg", catalog={secret: "x"})
    with pytest.raises(ConfigError, match="uri: credentials never go into the config") as error:  # was used to connect
        validated(TableConfig, {"format": "iceberg", "catalog": {"type": "rest", "uri": "https://AKIA1:SECRET2@cat.example"}},
                  "table")
    assert "SECRET2" not in str(error.value)
    assert TableConfig(format="iceberg", catalog={"type": "sql", "uri": "postgresql://auditor@db/c"})  # PGPASSWORD
    remote = catalog_properties(TableConfig(format="iceberg", catalog={"type": "rest", "uri": "http://catalog"}),
                                "s3://b/a", StorageOptions(endpoint_url="http://minio:9000", region="eu-west-1"))
    assert remote == {"type": "rest", "uri": "http://catalog", "s3.endpoint": "http://minio:9000", "s3.region": "eu-west-1"}


def test_embedded_catalog_opens_on_a_fresh_output(tmp_path, monkeypatch) -> None:
    """The default catalog of a local output that does not exist yet: made when the job opens it,
    absolute for a relative output; never made by a reader; a catalog that cannot be opened is one
    line naming it."""
    monkeypatch.chdir(tmp_path)
    table = TableConfig(format="iceberg")
    with pytest.raises(UserError, match=r"Iceberg table sfam.results: not found \(no catalog at .*fresh/audits/iceberg"):
        IcebergStore("fresh/audits", StorageOptions(), table).catalog()
    assert not (tmp_path / "fresh").exists()
    store = IcebergStore("fresh/audits", StorageOptions(), table, overwrite_run)
    assert store.properties["uri"] == f"sqlite:///{tmp_path}/fresh/audits/iceberg/catalog.db"
    store.prepare()
    assert (tmp_path / "fresh" / "audits" / "iceberg" / "catalog.db").is_file()
    (tmp_path / "blocked").write_text("a file where the catalog's folder would be")
    with pytest.raises(UserError, match=r"table.catalog: cannot open the Iceberg catalog at sqlite:///.*blocked"):
        IcebergStore(str(tmp_path / "blocked"), StorageOptions(), table, overwrite_run).prepare()
