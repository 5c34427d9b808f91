"""HiveParquetStore.read: a committed run's rows with that run's own columns, whatever other runs hold."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.results_store import ConcurrentCommit, HiveParquetStore
from pipeline.io.storage import StorageError, StorageOptions
from pipeline.io.tables import write_json
from pipeline.layout import RunLayout

OPTIONS = StorageOptions()


def write_part(output: Path, run_id: str, run_date: str, attempt: str, rows: dict[str, list], commit: bool) -> None:
    """One part file of the attempt in the table; _SUCCESS names the attempt when `commit`."""
    layout = RunLayout(str(output), run_id, run_date, attempt)
    folder = Path(layout.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"attempt": [attempt] * len(rows["pair_id"]), **rows}), folder / f"{layout.part_prefix}0.parquet")
    if commit:
        write_json(layout.success_marker, {"attempt": attempt}, OPTIONS)


def test_a_run_reads_its_own_columns(tmp_path: Path) -> None:
    # the oldest run (the table's first file) has no label, and its passed-through `team` is a number
    write_part(tmp_path, "old", "2026-01-01", "a1", {"pair_id": ["p"], "similarity": [0.5], "team": [7]}, commit=True)
    write_part(tmp_path, "new", "2026-02-01", "b1", {"pair_id": ["p", "q"], "similarity": [0.9, 0.1],
                                                      "label": [1, 0], "team": ["search", None]}, commit=True)
    write_part(tmp_path, "new", "2026-02-02", "b2", {"pair_id": ["x"], "similarity": [0.0], "label": [0],
                                                      "team": ["ads"]}, commit=False)  # a re-run still going
    store = HiveParquetStore(str(tmp_path), OPTIONS)
    new = store.read("new", columns=["pair_id", "label", "team", "run_id", "run_date", "query_bbox"])
    assert new.column_names == ["pair_id", "label", "team", "run_id", "run_date"]  # no query_bbox in this run
    assert new.to_pydict() == {"pair_id": ["p", "q"], "label": [1, 0], "team": ["search", None],
                               "run_id": ["new", "new"], "run_date": ["2026-02-01"] * 2}
    assert store.read("new", pair_ids=["q"]).column("similarity").to_pylist() == [0.1]
    old = store.read("old", columns=["pair_id", "label", "team"])
    assert old.to_pydict() == {"pair_id": ["p"], "team": [7]}


def test_a_run_that_never_committed_has_no_rows(tmp_path: Path) -> None:
    write_part(tmp_path, "going", "2026-02-02", "c1", {"pair_id": ["x"], "similarity": [0.0]}, commit=False)
    with pytest.raises(StorageError, match="runs/going: no committed rows"):
        HiveParquetStore(str(tmp_path), OPTIONS).read("going")


def test_a_damaged_result_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    write_part(tmp_path, "run", "2026-02-02", "c1", {"pair_id": ["x", "y"], "similarity": [0.0, 1.0]}, commit=True)
    (part,) = Path(RunLayout(str(tmp_path), "run", "2026-02-02", "c1").results_dir).glob("*.parquet")
    part.write_bytes(part.read_bytes()[:-20])  # truncated: no footer
    with pytest.raises(StorageError, match=r"result file is damaged: .*Parquet"):
        HiveParquetStore(str(tmp_path), OPTIONS).read("run")


def stage(output: Path, attempt: str, pair_ids: list[str]) -> RunLayout:
    """An attempt of run "r" with its rows staged and one overlay written, as the job leaves them before its commit."""
    layout = RunLayout(str(output), "r", "2026-03-01", attempt)
    staged = Path(layout.staged_results_dir)
    staged.mkdir(parents=True)
    pq.write_table(pa.table({"attempt": [attempt] * len(pair_ids), "pair_id": pair_ids}),
                   staged / f"{layout.part_prefix}0.parquet")
    Path(layout.png_dir).mkdir(parents=True)
    (Path(layout.png_dir) / "p.png").write_bytes(b"png")
    return layout


def test_a_staged_file_cut_short_by_a_kill_is_named_not_a_traceback(tmp_path: Path) -> None:
    """A killed attempt's rows stay staged, the report of its run reads them, and one may be cut short."""
    layout = stage(tmp_path, "a1", ["x", "y"])
    (part,) = Path(layout.staged_results_dir).glob("*.parquet")
    part.write_bytes(part.read_bytes()[:-20])
    store = HiveParquetStore(str(tmp_path), OPTIONS)
    for read in (store.staged_schema, store.read_staged):
        with pytest.raises(StorageError, match=r"attempts/a1/results: a result file is damaged: .*Parquet"):
            read(layout)


def commit(store: HiveParquetStore, layout: RunLayout, previous: str | None) -> None:
    store.commit(layout, {"attempt": layout.attempt}, {"attempt": layout.attempt}, previous)


# attempt ids sort by start time (layout.new_attempt_id)
EARLIER, LATER = "20260301T100000Z-aaaaaa", "20260301T100500Z-bbbbbb"


@pytest.mark.parametrize("first", [EARLIER, LATER])
def test_two_attempts_finishing_together_leave_the_first_commit_whole(tmp_path: Path, first: str) -> None:
    """Both attempts started when the run had no commit; the one that commits second stops at its
    re-check, after its rows moved into the table, and the first one's run reads whole."""
    store = HiveParquetStore(str(tmp_path), OPTIONS)
    layouts = {EARLIER: stage(tmp_path, EARLIER, ["a", "b"]), LATER: stage(tmp_path, LATER, ["c"])}
    second = LATER if first == EARLIER else EARLIER
    commit(store, layouts[first], previous=None)
    assert not Path(layouts[first].staged_results_dir).exists()  # its rows moved into the table, its folder went
    if second == LATER:  # the earlier attempt's clean-up leaves a later attempt's files alone
        assert Path(layouts[LATER].staged_results_dir).exists() and Path(layouts[LATER].png_dir).exists()
        with pytest.raises(ConcurrentCommit, match=f"run r: attempt {first} committed while attempt {second} ran"):
            commit(store, layouts[second], previous=None)
    else:  # the later attempt's clean-up deleted the earlier one's staged rows
        with pytest.raises(StorageError, match="staged rows are gone"):
            commit(store, layouts[second], previous=None)
    assert store.committed_attempt("r") == first
    expected = ["a", "b"] if first == EARLIER else ["c"]
    assert sorted(store.read("r").column("pair_id").to_pylist()) == expected
    assert (Path(layouts[first].png_dir) / "p.png").exists()


def test_staged_rows_deleted_by_a_later_commit_are_named(tmp_path: Path) -> None:
    """A later attempt's clean-up took an earlier, still running attempt's staged rows: one line, not a traceback."""
    layout = RunLayout(str(tmp_path), "r", "2026-03-01", EARLIER)
    with pytest.raises(StorageError, match="staged rows are gone: another attempt of the run_id committed"):
        HiveParquetStore(str(tmp_path), OPTIONS).read_staged(layout)


def test_an_output_root_whose_name_is_a_glob_pattern(tmp_path: Path) -> None:
    """Brackets, stars and question marks in the output root are the folder's name, not a pattern:
    the commit finds the staged rows and the earlier attempt's files, the reader finds the run."""
    output = tmp_path / "audits [prod]*?"
    store = HiveParquetStore(str(output), OPTIONS)
    commit(store, stage(output, EARLIER, ["a"]), previous=None)
    commit(store, stage(output, LATER, ["b", "c"]), previous=EARLIER)
    assert sorted(store.read("r").column("pair_id").to_pylist()) == ["b", "c"]
    assert [p.name for p in (output / "results").rglob("*.parquet")] == [f"part-{LATER}-0.parquet"]
    assert not Path(RunLayout(str(output), "r", "2026-03-01", EARLIER).png_dir).exists()


def test_a_rerun_deletes_what_showed_the_replaced_attempt(tmp_path: Path, caplog) -> None:
    """The run's default report and its comparisons (as A and as B) showed rows that the re-run deleted;
    other runs' comparisons stay. Each deletion is named in the log."""
    store = HiveParquetStore(str(tmp_path), OPTIONS)
    commit(store, stage(tmp_path, EARLIER, ["a"]), previous=None)
    shown = [Path(RunLayout(str(tmp_path), "r", "unused", "unused").report),
             tmp_path / "comparisons" / "r" / "later" / "summary.parquet",
             tmp_path / "comparisons" / "earlier" / "r" / "summary.parquet"]
    kept = [tmp_path / "comparisons" / "earlier" / "later" / "summary.parquet",
            tmp_path / "comparisons" / "r2" / "r-2" / "summary.parquet"]  # ids that start or end like r's
    for path in shown + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")
    with caplog.at_level("INFO", logger="sfam.results"):
        commit(store, stage(tmp_path, LATER, ["b"]), previous=EARLIER)
    assert store.read("r").column("pair_id").to_pylist() == ["b"]
    assert not any(path.exists() for path in shown) and all(path.exists() for path in kept)
    deleted = sorted(r.getMessage().split(": it showed")[0].removeprefix("deleted ") for r in caplog.records)
    assert deleted == sorted(str(path) if path.suffix == ".html" else str(path.parent) for path in shown)
