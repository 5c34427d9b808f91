"""`sfam report`: a run's static HTML report, read from the result table and the run record.

The report of a committed run has a section "Compared with RUN" (pipeline/comparison.py), placed
before the gallery, when its similarity gate has a baseline run: an earlier run with the same
metric that passed its gates, of the same manifest (of any, where the run's
`gates.similarity_baseline` is `previous_run`).

The report links each overlay relative to itself. When the overlays live on another
filesystem than the report (a run on S3, a report written locally), they are copied next
to the report, into `{report name}_overlays/`, so that the page shows them offline.
"""

from __future__ import annotations

import logging
import os
import posixpath
from urllib.parse import quote

from pipeline.comparison import compare_runs
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageError, StorageOptions, exists, join_uri, read_bytes, write_bytes
from pipeline.io.stores import open_results_store
from pipeline.layout import RunLayout, default_report, overlay_copies, safe_name
from pipeline.render import render_report
from pipeline.render.comparison_html import comparison_section
from pipeline.run_history import baseline_run, first_started, later_attempts, read_run_record

log = logging.getLogger(__name__)

REPORT_COLUMNS = (
    "pair_id", "query_uri", "reference_uri", "label", "rank", "score", "similarity", "status", "error",
    "query_energy_in_box", "reference_energy_in_box", "query_pointing_hit", "reference_pointing_hit", "png_uri",
)


def _path_part(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else os.path.abspath(uri)


def _relative(target: str, start_dir: str) -> str | None:
    """target relative to start_dir when both are on the same filesystem, else None."""
    same_scheme = target.partition("://")[0] == start_dir.partition("://")[0]
    if not same_scheme and ("://" in target or "://" in start_dir):
        return None
    return posixpath.relpath(_path_part(target), _path_part(start_dir))


class _OverlayLinks:
    """Relative links (URL-encoded) to overlays; those on another filesystem are copied next to
    the report, each once and only when the page shows it. An overlay that cannot be copied
    is shown as missing."""

    def __init__(self, report: str, options: StorageOptions) -> None:
        self.report_dir = report.rsplit("/", 1)[0] if "/" in report else "."
        self.copies = overlay_copies(report)
        self.options = options
        self.links: dict[str, str | None] = {}  # png_uri -> link

    def __call__(self, row: dict) -> str | None:
        uri = row.get("png_uri")
        if not uri:
            return None
        if uri not in self.links:
            link = _relative(uri, self.report_dir)
            self.links[uri] = quote(link) if link is not None else self._copy(uri, str(row["pair_id"]))
        return self.links[uri]

    def _copy(self, uri: str, pair_id: str) -> str | None:
        copy = join_uri(self.copies, f"{safe_name(pair_id)}.png")
        try:
            write_bytes(copy, read_bytes(uri, self.options), self.options)
        except StorageError as error:
            log.warning("overlay of pair %r not shown: %s", pair_id[:80], error)
            return None
        return quote(_relative(copy, self.report_dir))


def _comparison(output: str, record: dict, options: StorageOptions, table: TableConfig | None) -> str:
    """A "Compared with RUN" section against the run's baseline (run_history.baseline_run: the latest
    earlier run that passed its gates, of the same manifest unless similarity_baseline is previous_run), else "".

    False matches are counted at the run's own false-match similarity (compare_runs' default)."""
    config = record["config"]
    previous = baseline_run(output, record["run_id"], first_started(record), options, table=table,
                            manifest=config["manifest"], metric=config["model"]["metric"],
                            similarity_baseline=(config.get("gates") or {}).get("similarity_baseline", "same_manifest"))
    if previous is None:
        return ""
    comparison = compare_runs(output, previous["run_id"], record["run_id"], options, table=table)
    return comparison_section(comparison.view(), f"Compared with {previous['run_id']}")


def _failed_rows(store: ResultsStore, layout: RunLayout, options: StorageOptions) -> list[dict]:
    """A failed attempt's rows, which stay with it outside the table: none when it failed before
    staging them or they were discarded (an error, not bad rows, ended it)."""
    if not exists(layout.staged_results_dir, options):
        return []
    names = store.staged_schema(layout).names
    return store.read_staged(layout, columns=[c for c in REPORT_COLUMNS if c in names]).to_pylist()


def write_report(output: str, run_id: str, options: StorageOptions, destination: str | None = None,
                 table: TableConfig | None = None) -> str:
    """Writes the report (default {output}/reports/{run_id}.html) and returns where.

    table: the result table's format (the config's `table`); by default the Hive table.
    """
    destination = destination or default_report(output, run_id)
    summary = read_run_record(output, run_id, options)
    store = open_results_store(output, options, table)
    committed = store.committed_attempt(run_id) is not None  # succeeded, or finished and broke a gate
    if committed:
        rows = store.read(run_id=run_id, columns=list(REPORT_COLUMNS)).to_pylist()
    else:
        rows = _failed_rows(store, RunLayout(output, run_id, summary["run_date"], summary["attempt"]), options)
    page = render_report(
        summary, rows, png_href=_OverlayLinks(destination, options),
        comparison=_comparison(output, summary, options, table) if committed else "",
        later_attempts=later_attempts(output, summary, options) if committed else (),
    )
    write_bytes(destination, page.encode(), options)
    return destination
