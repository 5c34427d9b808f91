"""Which earlier run the similarity gate compares with."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io.iceberg_store import TableConfig
from pipeline.io.storage import StorageError, StorageOptions
from pipeline.io.tables import write_json
from pipeline.layout import attempt_record_uri, run_record_uri, success_marker_uri
from pipeline.overlays import render_pair_of_run
from pipeline.run_history import baseline_run, previous_successful_run, read_run_record, recorded_table

OPTIONS = StorageOptions()


def record(output: Path, run_id: str, started: str, status: str = "succeeded", committed: bool = True,
           table: dict | None = None) -> None:
    attempt = f"{run_id}-a1"
    config = {"manifest": "m.parquet", "model": {"metric": "cosine"}, **({"table": table} if table else {})}
    write_json(run_record_uri(str(output), run_id), {"run_id": run_id, "attempt": attempt, "status": status,
                                                    "timings": {"started": started}, "config": config}, OPTIONS)
    if committed:
        write_json(success_marker_uri(str(output), run_id), {"attempt": attempt}, OPTIONS)


def test_the_latest_committed_run_before_this_one(tmp_path: Path) -> None:
    record(tmp_path, "mon", "2026-11-23T02:00:00Z")
    record(tmp_path, "tue", "2026-11-24T02:00:00Z", status="failed", committed=False)
    record(tmp_path, "wed", "2026-11-25T02:00:00Z", status="gates_failed")
    # a record written as succeeded just before a kill, without the _SUCCESS that commits it: no rows to read
    record(tmp_path, "thu", "2026-11-26T02:00:00Z", committed=False)
    found = previous_successful_run(str(tmp_path), "fri", "2026-11-27T02:00:00Z", OPTIONS, metric="cosine")
    assert found is not None and found["run_id"] == "mon"  # wed broke its gates: no baseline
    assert previous_successful_run(str(tmp_path), "fri", "2026-11-24T00:00:00Z", OPTIONS)["run_id"] == "mon"
    assert previous_successful_run(str(tmp_path), "fri", "2026-11-27T02:00:00Z", OPTIONS, metric="dot") is None
    assert previous_successful_run(str(tmp_path), "wed", "2026-11-25T03:00:00Z", OPTIONS)["run_id"] == "mon"  # not itself


def test_only_runs_in_the_same_table_and_records_that_are_records(tmp_path: Path) -> None:
    """A Hive-era run has no rows in the Iceberg table that a later config names, and the reverse."""
    record(tmp_path, "hive", "2026-11-23T02:00:00Z")
    record(tmp_path, "iceberg", "2026-11-24T02:00:00Z", table={"format": "iceberg", "identifier": "audits.results"})
    record(tmp_path, "other-table", "2026-11-25T02:00:00Z", table={"format": "iceberg", "identifier": "audits.other"})
    write_json(run_record_uri(str(tmp_path), "not-a-record"), ["a", "list"], OPTIONS)
    now = "2026-11-27T02:00:00Z"
    assert previous_successful_run(str(tmp_path), "fri", now, OPTIONS)["run_id"] == "hive"
    found = previous_successful_run(str(tmp_path), "fri", now, OPTIONS,
                                    table=TableConfig(format="iceberg", identifier="audits.results"))
    assert found["run_id"] == "iceberg"


def test_the_baseline_is_of_the_same_manifest_unless_told_otherwise(tmp_path: Path) -> None:
    record(tmp_path, "mon", "2026-11-23T02:00:00Z")  # of m.parquet
    find = {"manifest": "other.parquet", "metric": "cosine"}
    now = "2026-11-27T02:00:00Z"
    assert baseline_run(str(tmp_path), "fri", now, OPTIONS, **find, similarity_baseline="same_manifest") is None
    assert baseline_run(str(tmp_path), "fri", now, OPTIONS, **find, similarity_baseline="previous_run")["run_id"] == "mon"
    assert baseline_run(str(tmp_path), "fri", now, OPTIONS, manifest="m.parquet", metric="dot",
                        similarity_baseline="previous_run") is None  # never another metric


def test_a_missing_run_record_asks_about_the_run_id_and_the_output(tmp_path: Path) -> None:
    """`sfam report`, `render` and `compare` of a run_id that is not there say the same."""
    record(tmp_path, "mon", "2026-11-23T02:00:00Z")
    assert read_run_record(str(tmp_path), "mon", OPTIONS)["run_id"] == "mon"
    with pytest.raises(StorageError, match=f"runs/nope/run.json: no run record: is run_id 'nope' under output {tmp_path}"):
        read_run_record(str(tmp_path), "nope", OPTIONS)
    with pytest.raises(StorageError, match="no run record: is run_id 'nope'"):
        render_pair_of_run(str(tmp_path), "nope", "p", OPTIONS)


def test_the_table_a_run_record_names(tmp_path: Path) -> None:
    """`sfam report OUTPUT` of an Iceberg run reads the table its record names, without --config."""
    iceberg = {"format": "iceberg", "identifier": "audits.results", "catalog": {"type": "sql", "uri": "sqlite:///c.db"}}
    record(tmp_path, "ice", "2026-11-23T02:00:00Z", table=iceberg)
    record(tmp_path, "hive", "2026-11-23T02:00:00Z", table={"format": "hive"})
    record(tmp_path, "old", "2026-11-23T02:00:00Z")  # a record from before the config had a table section
    assert recorded_table(str(tmp_path), "ice", OPTIONS) == TableConfig.model_validate(iceberg)
    assert [recorded_table(str(tmp_path), run_id, OPTIONS) for run_id in ("hive", "old", "missing")] == [None] * 3


def test_the_run_record_is_the_committed_attempts(tmp_path: Path) -> None:
    """A mistaken re-run killed between writing run.json and _SUCCESS (a new user's SIGKILL right after
    an Iceberg snapshot): the report read that attempt's record beside the committed attempt's rows."""
    record(tmp_path, "r", "2026-11-23T02:00:00Z")
    committed = {"run_id": "r", "attempt": "r-a1", "status": "succeeded", "config": {"model": {"input_size": 64}}}
    write_json(attempt_record_uri(str(tmp_path), "r", "r-a1"), committed, OPTIONS)
    assert read_run_record(str(tmp_path), "r", OPTIONS)["attempt"] == "r-a1"
    killed = {**committed, "attempt": "r-killed", "config": {"model": {"input_size": 40}}}
    write_json(run_record_uri(str(tmp_path), "r"), killed, OPTIONS)
    assert read_run_record(str(tmp_path), "r", OPTIONS) == committed
