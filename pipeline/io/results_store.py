"""The result table behind one seam: stage an attempt's rows, commit them as the run, read a run.

The job writes an attempt's rows through Ray into `staging()` (Parquet under the attempt's
folder, whatever the table format), then `commit()`s or `discard()`s them; the report, the
summaries and `sfam render` `read()` them. `HiveParquetStore` is the default table;
`IcebergStore` (iceberg_store.py) commits each run in one Iceberg snapshot.

How a Hive re-run is committed, and what readers see:

1. The attempt's parts are written under runs/ID/attempts/A/results/, outside the table:
   a failed or interrupted attempt never shows in the table.
2. On success they are moved into results/run_date=D/run_id=ID/ (file names carry the
   attempt, so nothing is overwritten). From here until step 4, a reader of the raw
   table sees the previous attempt's rows and the new ones of this run_id.
3. runs/ID/run.json, then runs/ID/_SUCCESS are written, naming attempt A: the commit.
   A reader that keeps rows whose `attempt` is the one `_SUCCESS` names (the `done`
   view of docs/cluster.md) switches from the old rows to the new ones at this write,
   and never sees a mix.
4. The parts and overlays of the run_id's attempts that started before this one are deleted,
   and so are the run's default report (reports/ID.html) and its comparisons with other runs
   (comparisons/ID/B/, comparisons/A/ID/), which showed the replaced attempt.

An attempt interrupted before step 3 leaves the previous run as it was (its rows,
overlays, run.json and _SUCCESS) plus its own leftovers, which the next attempt of the
run_id deletes in its step 4; interrupted between 3 and 4, the new run is committed and
the old files are deleted by the next attempt.

Two attempts of one run_id that finish together: each checks `_SUCCESS` before it commits and
again after step 2, and an attempt whose run another attempt committed in the meantime stops
there (ConcurrentCommit), its parts left for a later commit to delete; step 4 runs only while
`_SUCCESS` names the attempt, and never deletes a later attempt's files. There is no lock: two
commits within the same few milliseconds can still both write `_SUCCESS`; the later write wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from pipeline.errors import UserError
from pipeline.io.storage import StorageError, StorageOptions, exists, filesystem, glob, join_uri, move, redact_uri, remove_tree
from pipeline.io.tables import arrow_filesystem, read_json, write_json
from pipeline.layout import (
    RunLayout,
    comparison_dir,
    overlay_copies,
    part_prefix,
    run_dir_uri,
    run_record_uri,
    success_marker_uri,
)
from pipeline.schema import PARTITION_COLUMNS

log = logging.getLogger("sfam.results")


class ConcurrentCommit(UserError):
    """Another attempt of the run_id committed, or its committed run was removed, while this one ran."""

    def __init__(self, run_id: str, attempt: str, committed: str | None) -> None:
        what = f"attempt {committed} committed" if committed else "its committed run was removed"
        super().__init__(f"run {run_id}: {what} while attempt {attempt} ran, so this attempt leaves the run as it is; "
                         "run the audit again, once no other attempt of the run_id runs, to replace it")


class ResultsStore:
    """What every table format shares: staging under the attempt, run records, overlays."""

    def __init__(self, output: str, options: StorageOptions) -> None:
        self.output = output
        self.options = options

    def prepare(self) -> None:
        """Opens what a commit will need (a catalog), before the attempt's work starts."""

    def staging(self, layout: RunLayout) -> tuple[pafs.FileSystem, str]:
        """Where the attempt's part files are written (a pyarrow filesystem and a path)."""
        return arrow_filesystem(layout.staged_results_dir, self.options)

    def read_staged(self, layout: RunLayout, columns: list[str] | None = None) -> pa.Table:
        """The attempt's rows before they are committed."""
        staged = self._staged(layout)
        with _damaged_files_named(layout.staged_results_dir):  # a part file cut short where its writer was killed
            return staged.to_table(columns=columns)

    def staged_schema(self, layout: RunLayout) -> pa.Schema:
        """The schema of the attempt's staged rows (read from the files' footers only)."""
        return self._staged(layout).schema

    def _staged(self, layout: RunLayout) -> pds.Dataset:
        fs, path = self.staging(layout)
        try:
            with _damaged_files_named(layout.staged_results_dir):
                return pds.dataset(path.rstrip("/"), filesystem=fs, format="parquet")
        except FileNotFoundError as error:  # the job wrote them: a later attempt's commit deleted them since
            raise StorageError(layout.staged_results_dir, "the attempt's staged rows are gone: another attempt of the "
                               "run_id committed while this one ran; nothing of this attempt was committed") from error

    def committed_attempt(self, run_id: str) -> str | None:
        """The attempt that `_SUCCESS` names, or None when the run never succeeded."""
        return committed_attempt(self.output, run_id, self.options)

    def is_committed(self, run_id: str, attempt: str | None) -> bool:
        """Whether `_SUCCESS` names `attempt` (False where it cannot be read)."""
        try:
            return self.committed_attempt(run_id) == attempt
        except StorageError:
            return False

    def discard(self, layout: RunLayout) -> None:
        """Deletes a failed attempt's staged rows and overlays; its run record stays."""
        remove_tree(layout.staged_results_dir, self.options)
        remove_tree(layout.png_dir, self.options)

    def check_still_committed(self, layout: RunLayout, previous_attempt: str | None) -> None:
        """Raises ConcurrentCommit unless `_SUCCESS` still names the attempt the run had when this one started."""
        committed = self.committed_attempt(layout.run_id)
        if committed != previous_attempt:
            raise ConcurrentCommit(layout.run_id, layout.attempt, committed)

    def commit(self, layout: RunLayout, run_record: dict, success: dict, previous_attempt: str | None) -> None:
        """Makes the attempt's rows the run's rows, then writes run.json and _SUCCESS, unless another
        attempt committed meanwhile. Once _SUCCESS is written the run is committed: what the
        clean-up leaves, the next attempt deletes."""
        self._publish(layout)
        self.check_still_committed(layout, previous_attempt)
        write_json(layout.run_record, run_record, self.options)
        write_json(layout.success_marker, success, self.options)
        try:
            if self.committed_attempt(layout.run_id) == layout.attempt:  # a later attempt's commit cleans up itself
                self._remove_other_attempts(layout)
                remove_tree(layout.staged_results_dir, self.options)  # a copy of what the table holds now (Iceberg's)
        except StorageError as error:
            log.warning("run %s is committed; other attempts' files stay until its next attempt: %s",
                        layout.run_id, error)

    def read(self, run_id: str, columns: list[str] | None = None, pair_ids: list[str] | None = None) -> pa.Table:
        """A committed run's rows (those of `pair_ids`, where given), with run_id and run_date. Of
        `columns`, those the run has: runs may lack optional ones (label, the box columns, the manifest's own)."""
        attempt = self.committed_attempt(run_id)
        if attempt is None:
            raise StorageError(run_dir_uri(self.output, run_id), "no committed rows: the run has not succeeded")
        return self._read(run_id, attempt, columns, pair_ids)

    def _read(self, run_id: str, attempt: str, columns: list[str] | None, pair_ids: list[str] | None) -> pa.Table:
        """read's rows of the committed `attempt` (the format's own step)."""
        raise NotImplementedError

    def _publish(self, layout: RunLayout) -> None:
        """Puts the staged rows into the table as the run's rows (the format's own step)."""
        raise NotImplementedError

    def _remove_other_attempts(self, layout: RunLayout) -> None:
        """Deletes the staged rows and overlays of the run's attempts that started before this one
        (attempt ids sort by start time), and what showed their rows: the run's default report and
        its comparisons with other runs (`sfam report` and `sfam compare` write new ones)."""
        comparisons = join_uri(self.output, "comparisons")
        shown = [*([layout.report] if exists(layout.report, self.options) else []),
                 *glob(comparison_dir(self.output, layout.run_id, "*"), self.options, under=comparisons),
                 *glob(comparison_dir(self.output, "*", layout.run_id), self.options, under=comparisons)]
        for uri in shown:
            remove_tree(uri, self.options)
            log.info("deleted %s: it showed the rows of an attempt that run %s no longer has", redact_uri(uri),
                     layout.run_id)
        remove_tree(overlay_copies(layout.report), self.options)
        for folder in glob(join_uri(layout.png_root, "attempt=*"), self.options, under=layout.png_root):
            if folder.rstrip("/").rsplit("/", 1)[1].removeprefix("attempt=") < layout.attempt:
                remove_tree(folder, self.options)
        for folder in glob(join_uri(layout.run_dir, "attempts", "*", "results"), self.options, under=layout.run_dir):
            if folder.rstrip("/").rsplit("/", 2)[1] < layout.attempt:
                remove_tree(folder, self.options)

    def _table_format(self, run_id: str) -> str | None:
        """The table format the run's record names, or None where it cannot be read."""
        try:
            return recorded_table_format(read_json(run_record_uri(self.output, run_id), self.options).get("config", {}))
        except StorageError:
            return None


class HiveParquetStore(ResultsStore):
    """results/run_date=D/run_id=ID/part-ATTEMPT-*.parquet under the output root."""

    def __init__(self, output: str, options: StorageOptions) -> None:
        super().__init__(output, options)
        self.root = join_uri(output, "results")

    def _run_dataset(self, run_id: str, attempt: str) -> pds.Dataset:
        """The committed attempt's parts of the run, over their unified schema: the table's first
        file says nothing about this run's columns."""
        pattern = join_uri(self.root, "run_date=*", f"run_id={run_id}", f"{part_prefix(attempt)}*.parquet")
        parts = [filesystem(uri, self.options)[1] for uri in glob(pattern, self.options, under=self.root)]
        if not parts:
            if self._table_format(run_id) == "iceberg":  # read as Hive because no config named the catalog
                raise StorageError(run_dir_uri(self.output, run_id), "the run's rows are in an Iceberg table (its "
                                   "run.json says table.format: iceberg), read here as a Hive table: give the job's "
                                   "config, whose table section names that table, with --config (or add --set "
                                   "table.format=iceberg to a config without one)")
            raise StorageError(pattern, f"no result files of attempt {attempt}, which {success_marker_uri(self.output, run_id)} names")
        fs, root = arrow_filesystem(self.root, self.options)
        with _damaged_files_named(pattern):
            files = pds.dataset(parts, filesystem=fs, format="parquet")
            schema = pa.unify_schemas([part.physical_schema for part in files.get_fragments()] + [PARTITION_COLUMNS],
                                      promote_options="permissive")
        return pds.dataset(parts, schema=schema, filesystem=fs, format="parquet", partition_base_dir=root.rstrip("/"),
                           partitioning=pds.partitioning(PARTITION_COLUMNS, flavor="hive"))

    def _publish(self, layout: RunLayout) -> None:
        """Step 2: the staged parts move into the run's partition."""
        parts = glob(join_uri(layout.staged_results_dir, "*.parquet"), self.options, under=layout.staged_results_dir)
        if not parts:  # counted moments ago: another attempt's clean-up took them
            raise StorageError(layout.staged_results_dir, "the attempt's staged rows are gone; nothing was committed")
        for part in parts:
            move(part, join_uri(layout.results_dir, part.rsplit("/", 1)[1]), self.options)
        remove_tree(layout.staged_results_dir, self.options)  # empty now; a local folder would stay

    def _remove_other_attempts(self, layout: RunLayout) -> None:
        """Step 4, also the earlier attempts' rows in the table."""
        pattern = join_uri(self.root, "run_date=*", f"run_id={layout.run_id}", "*.parquet")
        for part in glob(pattern, self.options, under=self.root):
            if part.rsplit("/", 1)[1] < layout.part_prefix:  # part-ATTEMPT-...: sorts before ours when ATTEMPT does
                remove_tree(part, self.options)
        super()._remove_other_attempts(layout)

    def _read(self, run_id: str, attempt: str, columns: list[str] | None, pair_ids: list[str] | None) -> pa.Table:
        dataset = self._run_dataset(run_id, attempt)
        names = set(dataset.schema.names)
        present = None if columns is None else [c for c in columns if c in names]
        where = None if pair_ids is None else pds.field("pair_id").isin(pair_ids)
        with _damaged_files_named(run_dir_uri(self.output, run_id)):
            if where is not None:  # the files that hold them, found from the pair_id column alone (maps are most of a run)
                holding = {batch.fragment.path: batch.fragment
                           for batch in dataset.scanner(columns=["pair_id"], filter=where).scan_batches()
                           if batch.record_batch.num_rows}
                dataset = pds.FileSystemDataset(list(holding.values()), dataset.schema, dataset.format, dataset.filesystem)
            return dataset.to_table(columns=present, filter=where)


def committed_attempt(output: str, run_id: str, options: StorageOptions) -> str | None:
    """The attempt that the run's `_SUCCESS` names, or None when the run never succeeded."""
    marker = success_marker_uri(output, run_id)
    if not exists(marker, options, retried=True):  # also between a commit's steps: a blip must not fail it
        return None
    return read_json(marker, options).get("attempt")


def recorded_table_format(config: dict) -> str:
    """The table format a run's recorded config names: hive, also for records from before the
    config had a `table` section."""
    return (config.get("table") or {}).get("format", "hive")


@contextmanager
def _damaged_files_named(where: str) -> Iterator[None]:
    """Arrow's error on a result file that is not valid Parquet (truncated, overwritten) as a
    StorageError: one line that names the run, not a traceback."""
    try:
        yield
    except pa.ArrowInvalid as error:
        raise StorageError(where, f"a result file is damaged: {error}") from error
