"""`sfam report`: a run's static HTML report, read from the result table and the run record."""

from __future__ import annotations

import os
import posixpath

from pipeline.io.storage import StorageOptions, join_uri, write_bytes
from pipeline.io.tables import read_json, read_results
from pipeline.render import render_report

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


def write_report(output: str, run_id: str, options: StorageOptions, destination: str | None = None) -> str:
    """Writes the report (default {output}/reports/{run_id}.html) and returns where."""
    destination = destination or join_uri(output, "reports", f"{run_id}.html")
    summary = read_json(join_uri(output, "runs", run_id, "run.json"), options)
    table = read_results(join_uri(output, "results"), options, run_id=run_id)
    rows = table.select([c for c in REPORT_COLUMNS if c in table.column_names]).to_pylist()
    report_dir = destination.rsplit("/", 1)[0] if "/" in destination else "."
    page = render_report(
        {**summary, "model_id": summary.get("model_id"), "metric": summary.get("config", {}).get("model", {}).get("metric")},
        rows,
        png_href=lambda row: row.get("png_uri") and _relative(row["png_uri"], report_dir),
    )
    write_bytes(destination, page.encode(), options)
    return destination
