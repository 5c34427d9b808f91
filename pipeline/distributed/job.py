"""The audit job on Ray Data: check -> fetch -> explain (actor pool) -> render -> stage -> commit.

Everything that can be checked before work starts is checked on the driver first (config,
manifest, model, a trial explanation, the output's writability), and nothing that exists
is touched until an attempt has succeeded: its rows are staged outside the table and
committed only then (pipeline/io/results_store.py), so a failed or interrupted re-run
leaves the previous run of its run_id as it was.

The checks are preflight.py's, the actors' sizes resources.py's, and what an attempt records
run_record.py's; this module builds the Ray Data pipeline and runs, commits or fails the attempt.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.fs
import ray
from ray.data import ActorPoolStrategy

from pipeline.config import JobConfig
from pipeline.distributed.cluster import connect
from pipeline.distributed.explain import ExplainPairs
from pipeline.distributed.fetch import FetchImages
from pipeline.distributed.iceberg_commit import overwrite_run
from pipeline.distributed.parquet_reader import parquet_reader_v1
from pipeline.distributed.part_files import PartFiles
from pipeline.distributed.preflight import Plan, preflight
from pipeline.distributed.render import RenderResults
from pipeline.distributed.resources import (
    FETCH_CPUS,
    RENDER_CPUS,
    WRITE_CPUS,
    batch_size_for,
    check_actor_memory,
    cpus_per_actor,
    decodes_jpegs_in_actors,
    gpus_per_actor,
    num_actors_for,
)
from pipeline.distributed.run_record import SUMMARY_COLUMNS, RunRecorder, RunSummary, failure_reason, summarise
from pipeline.distributed.stages import StageChain
from pipeline.errors import AuditFailed, PipelineError, Terminated, as_sent
from pipeline.gates import Baseline, GateResult, GatesFailed, evaluate, same_label_similarity
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageError, StorageUnavailable, exists, redact_uri
from pipeline.io.stores import open_results_store
from pipeline.io.tables import arrow_filesystem, write_json
from pipeline.layout import RunLayout
from pipeline.manifest import ManifestInfo, manifest_dir, with_folder_columns
from pipeline.run_history import baseline_run
from pipeline.schema import SIDES

log = logging.getLogger("sfam.audit")


def _read_manifest(manifest: ManifestInfo, filesystem: pyarrow.fs.FileSystem) -> ray.data.Dataset:
    """The rows of the manifest's files (ManifestInfo.files, validated: whatever their names end
    with), read by Ray Data's V1 Parquet reader, which reads the few footers of a manifest itself.
    The Hive folder columns are added from each row's file as the validation typed them
    (ManifestInfo.folder_columns): Ray's own folder parser reads `__HIVE_DEFAULT_PARTITION__` as a
    value and types columns differently."""
    in_folders = manifest.folder_columns.num_columns > 0
    with parquet_reader_v1():
        rows = ray.data.read_parquet(list(manifest.files), filesystem=filesystem, partitioning=None,
                                     file_extensions=None, include_paths=in_folders)
    if not in_folders:
        return rows
    return rows.map_batches(with_folder_columns, fn_kwargs={"files": manifest.files, "folder_columns": manifest.folder_columns},
                            batch_format="pyarrow", batch_size=None)


def build_dataset(config: JobConfig, layout: RunLayout, gpus: float, manifest: ManifestInfo) -> ray.data.Dataset:
    """The streaming pipeline from the manifest to result rows (not yet executed); `gpus` per actor."""
    options = config.storage_options
    cpus = cpus_per_actor(config, gpus)
    manifest_fs = arrow_filesystem(config.manifest, options)[0]
    # blocks of one batch of adjacent rows: every actor gets work (a one-file manifest reads as one
    # block), and the pairs of one query stay together, so their images are forwarded once
    dataset = _read_manifest(manifest, manifest_fs).repartition(target_num_rows_per_block=config.batch_size)
    in_actors = decodes_jpegs_in_actors(config, gpus)
    log.info("JPEGs decoded %s", "by torchvision in the explain actors" if in_actors else "by Pillow in the fetch tasks")
    fetch = {"manifest_dir": manifest_dir(config.manifest), "input_size": config.model.input_size,
             "max_image_pixels": config.max_image_pixels, "storage_options": options, "decode_jpegs": not in_actors}
    explain = {"model": config.model, "storage_options": options, "attempt": layout.attempt,
               "max_image_pixels": config.max_image_pixels}
    render = {"layout": layout, "policy": config.render_png, "rules": config.render_flags, "storage_options": options}
    batches = {"batch_size": config.batch_size, "batch_format": "pyarrow"}
    actors = {"compute": ActorPoolStrategy(size=config.num_actors), "num_gpus": gpus, "num_cpus": cpus}
    if config.actor_memory is not None:
        actors["memory"] = int(config.actor_memory)
    if gpus:  # the GPU actors only explain; decoding and rendering run in CPU tasks beside them
        log.info("explaining with %d actor(s), %g GPU and %g CPU each", config.num_actors, gpus, cpus)
        dataset = dataset.map_batches(FetchImages(**fetch), num_cpus=FETCH_CPUS, **batches)
        dataset = dataset.map_batches(ExplainPairs, fn_constructor_kwargs=explain, **actors, **batches)
        return dataset.map_batches(RenderResults(**render), num_cpus=RENDER_CPUS, **batches)
    # CPU actors fetch, explain and render their own batches: no pixels pass through the object store
    log.info("fetching, explaining and rendering in %d actor(s) of %g CPU each", config.num_actors, cpus)
    stages = [(FetchImages, fetch), (ExplainPairs, explain), (RenderResults, render)]
    return dataset.map_batches(StageChain, fn_constructor_kwargs={"stages": stages}, **actors, **batches)


def _stage(dataset: ray.data.Dataset, config: JobConfig, layout: RunLayout, store: ResultsStore, pairs: int) -> None:
    """Runs the pipeline over the manifest's `pairs` into the attempt's staging folder, with a write
    task per actor at most, and no more than there are batches (Ray Data warns of idle ones).

    s3fs reports an endpoint that went down while Ray lists or reads the manifest as a
    missing file; the manifest was read moments before, so that is checked and said.
    """
    fs, path = store.staging(layout)
    try:
        dataset.write_parquet(path, filesystem=fs, filename_provider=PartFiles(layout.part_prefix),
                              ray_remote_args={"num_cpus": WRITE_CPUS},
                              concurrency=max(1, min(config.num_actors, math.ceil(pairs / config.batch_size))),
                              min_rows_per_file=config.rows_per_file)
    except FileNotFoundError:
        exists(config.manifest, config.storage_options)  # raises StorageUnavailable when unreachable
        raise


def _pipeline_error(error: BaseException) -> PipelineError | None:
    """The project's error behind Ray's wrappers (task errors, user-code exceptions), if any; never
    for an interruption, nor for an error raised while one of the project's was being handled."""
    if isinstance(error, KeyboardInterrupt):
        return None
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PipelineError):
            return current
        stack.extend([current.__cause__, getattr(current, "cause", None)])
    return _remote_storage_error(str(error))


_REMOTE_STORAGE_ERROR = re.compile(r"^pipeline\.io\.storage\.(StorageUnavailable|StorageError): (.+?): (.+)$", re.MULTILINE)


def _remote_storage_error(traceback_text: str) -> StorageError | None:
    """A storage error raised in a Ray Data worker: Ray Data wraps it (UserCodeException), and the
    cause does not cross the process boundary, so only the remote traceback's text names it."""
    found = _REMOTE_STORAGE_ERROR.findall(traceback_text)
    if not found:
        return None
    name, uri, reason = found[-1]
    return (StorageUnavailable if name == "StorageUnavailable" else StorageError)(uri, reason)


def _staged_columns(config: JobConfig, plan: Plan) -> list[str]:
    """The staged columns that the summary and the gates read, once, when the pipeline has run."""
    gated = config.gates.enabled
    boxes = [f"{side}_{name}" for side in SIDES for name in ("bbox", "energy_in_box")] if plan.manifest.has_boxes else []
    return [*SUMMARY_COLUMNS, *boxes, *(["label"] if gated and "label" in plan.manifest.schema.names else []),
            *(["query_pointing_hit"] if gated and plan.manifest.has_boxes else [])]


def run_audit(config: JobConfig) -> RunSummary:
    """Runs one attempt of the audit on the Ray cluster of this process (connect() joins or starts one)."""
    started = time.time()
    store = open_results_store(config.output, config.storage_options, config.table, overwrite_run)
    plan = preflight(config, store)
    config = config.model_copy(update={"model": plan.model})  # the replicas load the weights that were checked
    layout = plan.layout
    recorder = RunRecorder(config, plan, store, started)
    recording = False  # whether the attempt's first records are written
    try:
        recorder.started()
        recording = True
        log.info("attempt %s of run %s (committed attempt: %s)", layout.attempt, config.run_id, plan.previous_attempt)
        checked = time.time()
        store.prepare()
        connect()
        gpus = gpus_per_actor(config)
        config = config.model_copy(update={"num_actors": num_actors_for(config, gpus), "batch_size": batch_size_for(config, gpus)})
        check_actor_memory(config)
        _stage(build_dataset(config, layout, gpus, plan.manifest), config, layout, store, plan.manifest.num_rows)
        staged = store.read_staged(layout, _staged_columns(config, plan))
        summary = summarise(staged, layout, config, started, checked, gpus)
        _finish(config, plan, store, recorder, summary, staged)
    except (AuditFailed, GatesFailed):  # recorded: the rows failed (kept to look at), or committed and broke a gate
        raise
    except BaseException as error:  # interrupted too (also while it wrote its first records): not left "running"
        if isinstance(error, StorageError) and not recording:
            raise StorageError(config.output, f"output location is not writable: {error.reason}") from error
        if store.is_committed(config.run_id, layout.attempt):  # stopped in the clean-up after the commit: the run is this attempt's
            log.warning("attempt %s of run %s is committed; its clean-up of earlier attempts was cut short, and the "
                        "run's next attempt finishes it", layout.attempt, config.run_id)
            raise
        cause = _pipeline_error(error) or (as_sent(error) if isinstance(error, KeyboardInterrupt) else error)
        recorded = "is recorded as failed"
        try:  # best effort: the storage may be what failed
            recorder.failed(_failure_reason(cause))
        except StorageError as storage_error:
            recorded = "could not be recorded as failed"
            log.warning("could not record the failure of attempt %s: %s", layout.attempt, storage_error)
        try:  # a replica still writing when the driver stops may leave files behind
            store.discard(layout)
        except StorageError as storage_error:
            log.warning("attempt %s %s; some of its files stay until the run_id's next successful attempt deletes "
                        "them: %s", layout.attempt, recorded, storage_error)
        if cause is not error:
            raise cause from error
        raise
    return summary


def _failure_reason(cause: BaseException) -> str:
    """The failed attempt's reason: what stopped it, as its record says it."""
    if isinstance(cause, KeyboardInterrupt) and not isinstance(cause, Terminated):
        return "interrupted (Ctrl-C)"
    return f"{type(cause).__name__}: {cause}"


def _finish(config: JobConfig, plan: Plan, store: ResultsStore, recorder: RunRecorder, summary: RunSummary,
            staged: pa.Table) -> None:
    """Decides the attempt's status once, records it, and commits the attempt unless its rows failed."""
    for warning in summary.warnings:
        log.warning("%s", warning)
    reason = failure_reason(summary, plan.manifest.num_rows, config, plan.layout)
    if reason is not None:
        recorder.failed(reason, summary)
        raise AuditFailed(reason)
    gates = _evaluate_gates(config, store, staged, recorder.base["timings"]["first_started"])
    failed_gates = [g for g in gates if not g.passed]
    for gate in gates:
        (log.warning if not gate.passed or gate.value is None else log.info)("%s", gate.line())
    broken = "; ".join(g.line() for g in failed_gates)
    success = recorder.record("gates_failed" if failed_gates else "succeeded", summary, broken or None)
    success["gates"] = [g.as_record() for g in gates]
    store.check_still_committed(plan.layout, plan.previous_attempt)
    write_json(plan.layout.attempt_record, success, config.storage_options)
    store.commit(plan.layout, success, asdict(summary), plan.previous_attempt)
    if failed_gates:
        raise GatesFailed(broken, summary.lines())


def _evaluate_gates(config: JobConfig, store: ResultsStore, staged: pa.Table, started: str) -> list[GateResult]:
    """The config's gates on the attempt's staged rows (_staged_columns); the similarity drop against
    the baseline run, the latest that passed its gates before this run first ran (`started`)."""
    if not config.gates.enabled:
        return []
    baseline = None if config.gates.max_similarity_drop is None else _baseline(config, store, started)
    return evaluate(config.gates, staged, baseline)


def _baseline(config: JobConfig, store: ResultsStore, started: str) -> Baseline:
    """The run max_similarity_drop compares with (gates.similarity_baseline), always one with the same metric."""
    metric = config.model.metric
    previous = baseline_run(config.output, config.run_id, started, config.storage_options, table=config.table,
                            manifest=redact_uri(config.manifest), metric=metric,
                            similarity_baseline=config.gates.similarity_baseline)
    if previous is None:
        wanted = "of this manifest" if config.gates.similarity_baseline == "same_manifest" else "under this output"
        return Baseline(None, None, f"no earlier successful run {wanted} with metric {metric} to compare with")
    rows = store.read(run_id=previous["run_id"], columns=["status", "label", "similarity"])
    mean, pairs = same_label_similarity(rows)
    return Baseline(previous["run_id"], mean, f"against run {previous['run_id']}", pairs)
