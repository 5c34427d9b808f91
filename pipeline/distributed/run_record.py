"""What an attempt of the audit records: its summary (counts, speed, warnings), whether its rows
are acceptable, and its run.json records (the attempt's own, and the run's when it commits or
when the run_id has no committed attempt to keep).
"""

from __future__ import annotations

import datetime as dt
import platform
import resource
import sys
import time
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.distributed.preflight import Plan
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageError, redact_all, redact_uri
from pipeline.io.tables import read_json, write_json
from pipeline.layout import RunLayout
from pipeline.models.loading import random_weights_warning
from pipeline.quality import boxes_outside_warning, empty_maps_warning, one_cell_maps_warning, residual_warning
from pipeline.run_history import first_started

# what builds the model (timm: `arch: timm/...`; safetensors: its weights) and what reads and writes the data
PACKAGES = ("sfam-pipeline", "torch", "torchvision", "timm", "safetensors", "ray", "pyarrow", "fsspec", "s3fs", "pydantic",
            "pillow", "numpy")
SUMMARY_COLUMNS = ["status", "forward_share", "device", "similarity", "residual_query", "residual_reference",
                   "query_peak_xy", "reference_peak_xy", "map_shape"]


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    attempt: str
    pairs: int
    ok: int
    error: int
    wall_seconds: float
    preflight_seconds: float  # of wall_seconds: checking before any work started (pre-flight, attempt record)
    pairs_per_second: float
    forward_passes_per_pair: float
    devices: tuple[str, ...]
    num_actors: int
    gpus_per_actor: float
    batch_size: int
    results: str
    png: str | None
    run_record: str
    warnings: tuple[str, ...]

    def lines(self) -> list[str]:
        return [
            f"run {self.run_id}: {self.pairs} pairs, {self.ok} ok, {self.error} error (attempt {self.attempt})",
            f"{self.wall_seconds:.1f} s ({self.preflight_seconds:.2f} s checking before the start), "
            f"{self.pairs_per_second:.1f} pairs/s, "
            f"{self.forward_passes_per_pair:.2f} forward passes per pair",
            f"explained on: {', '.join(self.devices) or 'nothing'} ({self.num_actors} actor(s))",
            f"results: {self.results}",
            *([f"overlays: {self.png}"] if self.png else []),
            f"run record: {self.run_record}",
            *(f"warning: {w}" for w in self.warnings),
        ]


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def summarise(rows: pa.Table, layout: RunLayout, config: JobConfig, started: float, checked: float,
              gpus_per_actor: float) -> RunSummary:
    """Counts, speed and warnings of the attempt's staged rows (at least SUMMARY_COLUMNS);
    `started` and `checked` (time.time()): when run_audit started and when its checks were done."""
    wall = time.time() - started
    ok_mask = pc.equal(rows.column("status"), "ok")
    ok_rows = rows.filter(ok_mask)
    ok = ok_rows.num_rows
    residual = residual_warning(*(ok_rows.column(c).to_numpy(zero_copy_only=False)
                                  for c in ("similarity", "residual_query", "residual_reference")),
                                config.model.metric) if ok else None
    found = (random_weights_warning(config.model), residual, empty_maps_warning(ok_rows), boxes_outside_warning(ok_rows),
             one_cell_maps_warning(ok_rows["map_shape"]))
    warnings = tuple(warning for warning in found if warning)
    return RunSummary(
        run_id=config.run_id, attempt=layout.attempt, pairs=rows.num_rows, ok=ok, error=rows.num_rows - ok,
        wall_seconds=wall, preflight_seconds=checked - started, pairs_per_second=rows.num_rows / wall,
        forward_passes_per_pair=float(np.nansum(ok_rows.column("forward_share").to_numpy(zero_copy_only=False))) / max(ok, 1),
        devices=tuple(sorted(pc.unique(rows.column("device")).drop_null().to_pylist())), num_actors=config.num_actors,
        gpus_per_actor=gpus_per_actor, batch_size=config.batch_size,
        results=_results_location(config, layout), png=redact_uri(layout.png_dir) if config.render_png != "none" else None,
        run_record=redact_uri(layout.run_record), warnings=warnings,
    )


def _results_location(config: JobConfig, layout: RunLayout) -> str:
    """Where the run's rows are: its Hive partition, or the Iceberg table (rows with run_id = ID)."""
    if config.table.format == "iceberg":
        return f"Iceberg table {config.table.identifier}, run_id = {config.run_id}"
    return redact_uri(layout.results_dir)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def failure_reason(summary: RunSummary, manifest_rows: int, config: JobConfig, layout: RunLayout) -> str | None:
    """Why the attempt's result is not acceptable, or None: decided once, before anything is recorded."""
    if summary.pairs != manifest_rows:
        return f"{summary.pairs} result rows for {manifest_rows} manifest rows"
    fraction = summary.error / max(summary.pairs, 1)
    if fraction > config.max_error_fraction:
        return (f"{summary.error} of {summary.pairs} pairs failed ({fraction:.1%} > max_error_fraction "
                f"{config.max_error_fraction:.1%}); see the error column of {redact_uri(layout.staged_results_dir)}")
    return None


class RunRecorder:
    """Writes run.json for an attempt: its own record always, the run's record when it commits or
    when the run_id has no committed attempt to keep."""

    def __init__(self, config: JobConfig, plan: Plan, store: ResultsStore, started: float) -> None:
        self.config, self.plan, self.store = config, plan, store
        self.base = {
            "run_id": config.run_id, "attempt": plan.layout.attempt, "run_date": plan.layout.run_date,
            "config": redact_all(config.model_dump(mode="json")),
            "model_id": config.model.model_id, "target_layer": plan.target_layer,
            "weights_sha256": plan.model.weights_sha256, "versions": _versions(),
            "previous_attempt": plan.previous_attempt,
            "timings": {"started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat()},
        }
        self.base["timings"]["first_started"] = self._first_started()

    def _first_started(self) -> str:
        """When the run_id first ran, which a re-run keeps (run_history.first_started): from the run's
        record, the committed attempt's or, where none committed, the last failed attempt's (a night
        re-run after a failure keeps its place too); this attempt's start where there is no record."""
        try:
            return first_started(read_json(self.plan.layout.run_record, self.config.storage_options))
        except StorageError:
            return self.base["timings"]["started"]

    def record(self, status: str, summary: RunSummary | None = None, reason: str | None = None) -> dict:
        record = {**self.base, "status": status, "reason": None if reason is None else redact_uri(reason)}
        if status != "running":  # when it ended, also for an attempt stopped before it had a summary
            record["timings"] = {**self.base["timings"], "finished": dt.datetime.now(dt.timezone.utc).isoformat()}
        if summary is not None:
            record["counts"] = {"pairs": summary.pairs, "ok": summary.ok, "error": summary.error,
                                "manifest_rows": self.plan.manifest.num_rows}
            record["timings"] = {**record["timings"], "wall_seconds": summary.wall_seconds,
                                 "preflight_seconds": summary.preflight_seconds,
                                 "pairs_per_second": summary.pairs_per_second}
            record["forward_passes_per_pair"] = summary.forward_passes_per_pair
            record["warnings"] = list(summary.warnings)
            record["resources"] = {
                "num_actors": summary.num_actors, "gpus_per_actor": summary.gpus_per_actor,
                "batch_size": summary.batch_size,
                "devices": list(summary.devices),
                "driver_peak_rss_mib": peak_rss_bytes() / 2**20,
            }
        return record

    def started(self) -> None:
        """The attempt's first write (it also proves the output location is writable); the run's
        record too where no attempt is committed, so that a first attempt killed before it could
        record its end (SIGKILL, a lost node) leaves a run that says `running`, not no run at all."""
        self._write(self.record("running"))

    def failed(self, reason: str, summary: RunSummary | None = None) -> None:
        """The attempt's record says it failed; the run's record is the committed attempt's, if any."""
        self._write(self.record("failed", summary, reason))

    def _write(self, record: dict) -> None:
        """The attempt's `record`, then the run's record."""
        write_json(self.plan.layout.attempt_record, record, self.config.storage_options)
        self._record_run_unless_committed(record)

    def _record_run_unless_committed(self, record: dict) -> None:
        """The run's record is this attempt's `record` where no attempt is committed, else the committed
        attempt's: also after a commit cut short, or one made just after this attempt looked."""
        options, layout = self.config.storage_options, self.plan.layout
        committed = self.store.committed_attempt(self.config.run_id)
        if committed is None:
            write_json(layout.run_record, record, options)
            committed = self.store.committed_attempt(self.config.run_id)  # another may have committed meanwhile
        if committed is not None and read_json(layout.run_record, options).get("attempt") != committed:
            kept = replace(layout, attempt=committed).attempt_record  # the same record, written first
            write_json(layout.run_record, read_json(kept, options), options)
