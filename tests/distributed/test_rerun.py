"""A re-run never costs the finished run of its run_id: mistaken, failed and killed re-runs.

The runs are `python -m jobs.audit` processes, as a scheduler or `ray job submit` starts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pytest
import yaml

from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageOptions, join_uri, read_bytes
from pipeline.io.tables import read_json
from pipeline.reporting import write_report

from audit_data import job_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "nightly-1"


def snapshot(output: Path) -> dict[str, str]:
    """sha256 of every file under the output root, by relative path."""
    return {str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(output.rglob("*")) if p.is_file()}


def start_job(config_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "jobs.audit", "--config", str(config_path),
               *(arg for o in overrides for arg in ("--set", o))]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_job(config_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    process = start_job(config_path, *overrides)
    stdout, stderr = process.communicate(timeout=400)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (its local Ray included)."""
    family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):  # it ended on its own
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)


def documented_queries(output: Path) -> list[str]:
    """The statements of docs/cluster.md's DuckDB block (its views, then its queries), pointed at a
    local output root and at RUN_ID."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"```sql\n(CREATE VIEW audits .*?)```", text, flags=re.S).group(1)
    statements = [re.sub(r"^(--[^\n]*\n)+", "", s.strip()) for s in block.split(";\n")]  # without the comments above
    statements = [s for s in statements if s]
    return [s.replace("s3://bucket/audits", str(output)).replace("nightly-2026-11-26", RUN_ID) for s in statements]


def documented_views(output: Path) -> list[str]:
    return [s for s in documented_queries(output) if s.startswith("CREATE VIEW")]


def done_rows(output: Path) -> list[tuple]:
    """The run's rows as a reader of the table sees them through the documented `finished` view."""
    connection = duckdb.connect()
    for statement in documented_views(output):
        connection.sql(statement)
    return connection.sql(f"SELECT pair_id, similarity FROM finished WHERE run_id = '{RUN_ID}' ORDER BY pair_id").fetchall()


@pytest.fixture
def finished_run(tmp_path, rng) -> tuple[Path, Path, list[dict]]:
    """A successful run of RUN_ID: (config file, output root, manifest rows)."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=12, top_k=6)
    # files of one batch: rows are staged while the run goes on, so that a re-run can be killed halfway
    config = job_config(root, options, manifest, RUN_ID, batch_size=4, rows_per_file=4, max_error_fraction=0.0)
    config_path = tmp_path / "audit.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    first = run_job(config_path)
    assert first.returncode == 0, first.stderr[-3000:]
    return config_path, tmp_path / "audits", rows


def test_the_documented_duckdb_queries_run_on_a_finished_run(finished_run) -> None:
    _config_path, output, rows = finished_run
    connection = duckdb.connect()
    views = documented_views(output)
    assert [view.split()[2] for view in views] == ["audits", "done", "finished"]
    for view in views:
        connection.execute(view)
    queries = [s for s in documented_queries(output) if not s.startswith("CREATE VIEW")]
    answered = {query: connection.sql(query).fetchall() for query in queries}  # each runs
    assert len(answered) >= 6
    per_label = next(found for statement, found in answered.items() if "AS mean_similarity" in statement)
    assert sum(row[3] for row in per_label) == len(rows)
    images = next(found for statement, found in answered.items() if "AS query_image" in statement)
    assert images and all(Path(image).is_file() for _pair_id, image in images)  # the manifest's relative URIs, resolved


def test_mistaken_reruns_are_refused_before_anything_changes(finished_run) -> None:
    config_path, output, rows = finished_run
    before = snapshot(output)
    mistakes = {
        "model.target_layer=layer5": "layer5",
        "model.weights=" + str(output.parent / "models" / "missing.pt"): "missing.pt",
        "manifest=" + str(output.parent / "nowhere.parquet"): "nowhere.parquet",
    }
    for override, named in mistakes.items():
        started = time.time()
        done = run_job(config_path, override)
        seconds = time.time() - started
        print(f"{override}: exit {done.returncode} in {seconds:.1f} s: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and named in last
        assert "Traceback" not in done.stderr
        assert snapshot(output) == before  # not one byte of the finished run changed, nothing added
    assert len(done_rows(output)) == len(rows)


def test_failed_and_killed_reruns_leave_the_finished_run_as_it_was(finished_run) -> None:
    config_path, output, rows = finished_run
    before = snapshot(output)
    committed = read_json(str(output / "runs" / RUN_ID / "_SUCCESS"), StorageOptions())["attempt"]

    # a re-run that fails on its rows (every image unreadable) is recorded as failed and changes nothing
    failed = run_job(config_path, "max_image_pixels=16")
    assert failed.returncode == 1 and "audit failed:" in failed.stderr.strip().splitlines()[-1], failed.stderr[-3000:]
    assert {k: v for k, v in snapshot(output).items() if k in before} == before
    attempts = [read_json(str(p), StorageOptions()) for p in (output / "runs" / RUN_ID / "attempts").glob("*/run.json")]
    assert sorted(a["status"] for a in attempts) == ["failed", "succeeded"]
    assert len(done_rows(output)) == len(rows)

    # a re-run killed halfway: once it has staged rows and overlays, SIGKILL it and its Ray
    def staged() -> set[Path]:
        return set((output / "runs" / RUN_ID / "attempts").glob("*/results/*.parquet"))

    earlier = staged()  # the failed attempt's rows stay with it, for inspection
    process = start_job(config_path)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not staged() - earlier:
        time.sleep(0.1)
    assert process.poll() is None, "the re-run finished before it could be killed"
    kill_tree(process)
    assert {k: v for k, v in snapshot(output).items() if k in before} == before
    table = HiveParquetStore(str(output), StorageOptions()).read(run_id=RUN_ID)
    assert sorted(table.column("pair_id").to_pylist()) == sorted(r["pair_id"] for r in rows)
    assert set(table.column("attempt").to_pylist()) == {committed}
    assert len(done_rows(output)) == len(rows)
    # the run's report says that the two later attempts did not commit, the failed one first
    page = read_bytes(write_report(str(output), RUN_ID, StorageOptions(), str(output.parent / "report.html")), None).decode()
    later = re.findall(r"A later attempt of this run, (\S+) \(started [^)]+\), (failed|has not committed)", page)
    assert [outcome for _, outcome in later] == ["failed", "has not committed"] and committed not in dict(later)

    # the next re-run commits and removes every other attempt's rows and overlays
    final = run_job(config_path)
    assert final.returncode == 0, final.stderr[-3000:]
    new = read_json(str(output / "runs" / RUN_ID / "_SUCCESS"), StorageOptions())["attempt"]
    assert new != committed
    parts = list((output / "results").rglob("*.parquet"))
    assert parts and all(p.name.startswith(f"part-{new}-") for p in parts)
    assert [p.name for p in (output / "png" / f"run_id={RUN_ID}").iterdir()] == [f"attempt={new}"]
    assert len(done_rows(output)) == len(rows)
    page = read_bytes(write_report(str(output), RUN_ID, StorageOptions(), str(output.parent / "report.html")), None).decode()
    assert "A later attempt" not in page  # they started before the committed one
