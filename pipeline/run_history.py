"""Earlier runs under an output root, found from their run records (runs/*/run.json)."""

from __future__ import annotations

from pipeline.io.iceberg_store import TableConfig
from pipeline.io.results_store import ResultsStore, committed_attempt, recorded_table_format
from pipeline.io.storage import StorageError, StorageOptions, exists, glob
from pipeline.io.tables import read_json
from pipeline.layout import attempt_record_uri, run_record_uri


def later_attempts(output: str, record: dict, options: StorageOptions) -> list[dict]:
    """The records of the run_id's attempts that started after the committed one of `record` and did
    not commit (failed, or running or killed), earliest first: a re-run that went wrong leaves the run
    as it was, and the run's report says so."""
    later = []
    for uri in glob(attempt_record_uri(output, record["run_id"], "*"), options, under=output):
        try:
            attempt = read_json(uri, options)
        except StorageError:
            continue  # a record being written
        if not isinstance(attempt, dict):
            continue  # not a record
        if (attempt.get("attempt") != record.get("attempt") and _started(attempt) > _started(record)
                and attempt.get("status") not in ("succeeded", "gates_failed")):
            later.append(attempt)
    return sorted(later, key=_started)


def _started(record: dict) -> str:
    """When the record's attempt started (ISO-8601 UTC), "" where it does not say."""
    return (record.get("timings") or {}).get("started") or ""


def _table_of(config: dict) -> tuple[str, str | None]:
    """(format, Iceberg identifier) of a recorded config's `table` section."""
    fmt = recorded_table_format(config)
    return fmt, (config.get("table") or {}).get("identifier", TableConfig().identifier) if fmt == "iceberg" else None


def read_run_record(output: str, run_id: str, options: StorageOptions) -> dict:
    """The run's record (run.json); a StorageError that asks whether the run_id and the output are
    right where there is none. Where `_SUCCESS` names another attempt than run.json (an attempt killed
    between writing the two), the record of the attempt `_SUCCESS` names: that attempt is the run."""
    uri = run_record_uri(output, run_id)
    if not exists(uri, options):  # one quick look first: a wrong output or endpoint fails here, at once
        raise StorageError(uri, f"no run record: is run_id {run_id!r} under output {output}?")
    record = read_json(uri, options)
    committed = committed_attempt(output, run_id, options)
    if committed is None or record.get("attempt") == committed:
        return record
    return read_json(attempt_record_uri(output, run_id, committed), options)


def recorded_table(output: str, run_id: str, options: StorageOptions) -> TableConfig | None:
    """The Iceberg table a run's record names (its config's `table`, which holds no secrets), so that
    reading the run needs no config; None for the Hive table, or where the record cannot say."""
    try:
        config = read_json(run_record_uri(output, run_id), options).get("config") or {}
        return TableConfig.model_validate(config["table"]) if recorded_table_format(config) == "iceberg" else None
    except (StorageError, ValueError, AttributeError):  # the readers name a missing or odd record
        return None


def first_started(record: dict) -> str:
    """When the run first ran: the start of its first attempt, failed ones included (a re-run of an
    old night keeps its place among the nights); an ISO-8601 UTC string."""
    timings = record.get("timings") or {}
    return timings.get("first_started") or timings.get("started") or ""


def baseline_run(output: str, run_id: str, started_before: str, options: StorageOptions, *, manifest: str,
                 metric: str, similarity_baseline: str, table: TableConfig | None = None) -> dict | None:
    """The run record of the earlier run that a run's similarity gate and its report compare with:
    the latest that passed its gates (a run that broke them is no baseline: a drop would alert once,
    then pass against itself), with the same metric, of the same `manifest` (as recorded:
    credentials redacted) unless `similarity_baseline` is previous_run (a new manifest each night)."""
    return previous_successful_run(output, run_id, started_before, options, table=table, metric=metric,
                                   manifest=manifest if similarity_baseline == "same_manifest" else None)


def previous_successful_run(output: str, run_id: str, started_before: str, options: StorageOptions,
                            manifest: str | None = None, metric: str | None = None,
                            table: TableConfig | None = None) -> dict | None:
    """The run record of the latest run that succeeded and passed its gates and that first ran
    before `started_before`, of `manifest` and with `metric` where given, whose rows are in `table`
    (default: the Hive table).

    `run_id` itself is skipped (a re-run compares with another run, not with its own past).
    Manifests are compared as recorded (credentials redacted); times are ISO-8601 UTC strings.
    """
    wanted_table = _table_of({"table": (table or TableConfig()).model_dump()})
    candidates = []
    for uri in glob(run_record_uri(output, "*"), options, under=output):
        try:
            record = read_json(uri, options)
        except StorageError:
            continue  # a record being written, or not ours
        if not isinstance(record, dict):
            continue  # not a run record
        config = record.get("config", {})
        if (record.get("run_id") != run_id and record.get("status") == "succeeded"
                and manifest in (None, config.get("manifest")) and metric in (None, config.get("model", {}).get("metric"))
                and _table_of(config) == wanted_table and first_started(record) < started_before):
            candidates.append(record)
    # latest first; a record written just before a kill, without the _SUCCESS that commits it, has no rows to read
    store = ResultsStore(output, options)
    return next((record for record in sorted(candidates, key=first_started, reverse=True)
                 if store.is_committed(record["run_id"], record.get("attempt"))), None)
