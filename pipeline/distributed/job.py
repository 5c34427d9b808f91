"""The audit job on Ray Data: check -> fetch -> explain (actor pool) -> render -> stage -> commit.

Everything that can be checked before work starts is checked on the driver first (config,
manifest, model, a trial explanation, the output's writability), and nothing that exists
is touched until an attempt has succeeded: its rows are staged outside the table and
committed only then (pipeline/io/results_store.py), so a failed or interrupted re-run
leaves the previous run of its run_id as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import ray
import torch
import torchvision
from pydantic import ByteSize
from ray.data import ActorPoolStrategy

from pipeline.config import ConfigError, JobConfig
from pipeline.distributed.cluster import connect, started_here
from pipeline.distributed.explain import ExplainPairs
from pipeline.distributed.fetch import FetchImages
from pipeline.distributed.iceberg_commit import overwrite_run
from pipeline.distributed.parquet_reader import parquet_reader_v1
from pipeline.distributed.part_files import PartFiles
from pipeline.distributed.render import RenderResults
from pipeline.distributed.stages import StageChain
from pipeline.errors import AuditFailed, PipelineError, Terminated, UserError, as_sent
from pipeline.gates import Baseline, GateResult, GatesFailed, check_manifest_supports, evaluate, same_label_similarity
from pipeline.io.images import torchvision_has_jpeg_decoder
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import StorageError, StorageUnavailable, exists, redact_all, redact_uri, resolve_uri
from pipeline.io.stores import open_results_store
from pipeline.io.tables import arrow_filesystem, read_json, write_json
from pipeline.layout import RunLayout, new_attempt_id
from pipeline.manifest import ManifestError, ManifestInfo, manifest_dir, open_manifest, validate_manifest, with_folder_columns
from pipeline.models.explainer import build_explainer
from pipeline.models.loading import random_weights_warning
from pipeline.models.spec import ModelSpec
from pipeline.quality import boxes_outside_warning, empty_maps_warning, residual_warning
from pipeline.run_history import baseline_run, first_started
from pipeline.schema import SIDES

log = logging.getLogger("sfam.audit")
RENDER_CPUS = 0.5  # a render task's share beside GPU actors: light under the default policy
READER_CPUS = 1.0  # Ray Data's manifest reader: its streaming repartition holds one CPU for the whole run
WRITE_CPUS = 0.25  # a Parquet write task; num_actors of them at most
FETCH_CPUS = 1.0  # a fetch task beside GPU actors
CPU_ACTORS = 2  # num_actors by default where the cluster has no GPU
# Beside GPUs, by default: replicas of 1/GPU_REPLICAS GPU each, batches of GPU_BATCH_SIZE pairs. On one H200
# (BENCHMARKS.md, "The whole job on a GPU: replicas and batch size"), 4 replicas of resnet50 explained 1.47 to
# 1.58x the pairs/s of 2, and batches of 128 pairs 2.0 to 2.3x those of 32: one replica's Python work and Ray Data's
# work per batch leave the GPU idle unless other replicas fill it.
GPU_REPLICAS = 4
GPU_BATCH_SIZE = 128
CPU_BATCH_SIZE = 32
PACKAGES = ("sfam-pipeline", "torch", "torchvision", "ray", "pyarrow", "fsspec", "s3fs", "pydantic", "pillow", "numpy")
SUMMARY_COLUMNS = ["status", "forward_share", "device", "similarity", "residual_query", "residual_reference",
                   "query_peak_xy", "reference_peak_xy"]


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


@dataclass(frozen=True)
class Plan:
    """What the pre-flight check found: the run can start."""

    manifest: ManifestInfo
    layout: RunLayout
    target_layer: str
    model: ModelSpec  # the config's, its weights pinned to the SHA-256 of the file that was checked (every replica's)
    previous_attempt: str | None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _gpus_per_actor(config: JobConfig) -> float:
    """config.gpus_per_actor, or by default 1/GPU_REPLICAS where the cluster has a GPU now, else 0."""
    if config.gpus_per_actor is not None:
        return config.gpus_per_actor
    return 1 / GPU_REPLICAS if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def batch_size_for(config: JobConfig, gpus: float) -> int:
    """config.batch_size, or by default GPU_BATCH_SIZE where the actors hold `gpus` > 0 each, else CPU_BATCH_SIZE."""
    if config.batch_size is not None:
        return config.batch_size
    return GPU_BATCH_SIZE if gpus > 0 else CPU_BATCH_SIZE


def _num_actors(config: JobConfig, gpus: float) -> int:
    """config.num_actors, or by default as many actors of `gpus` GPUs each as the cluster has GPUs
    for now (at least one), and CPU_ACTORS without GPUs. Refuses GPUs that a local Ray started by
    the job lacks; warns when the actors need more GPUs than a cluster has now (they wait for them)."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    actors = config.num_actors
    if actors is None:
        actors = max(1, math.floor(cluster_gpus / gpus + 1e-9)) if gpus > 0 else CPU_ACTORS
    if gpus > cluster_gpus and started_here():
        raise UserError(f"gpus_per_actor={gpus:g}, but this machine has {cluster_gpus:g} GPU(s), and the local Ray the "
                        "job started cannot gain any: leave gpus_per_actor out (or 0) to explain on the CPU, or run "
                        "where there are GPUs (a GPU node, or `ray job submit` to a cluster that has or adds them)")
    if gpus > 0 and actors * gpus > cluster_gpus:
        log.warning("%d actor(s) x %g GPU each, but the cluster has %g GPU(s) now: the actors beyond that wait for "
                    "GPUs an autoscaler may add; num_actors x gpus_per_actor within the GPUs runs without waiting",
                    actors, gpus, cluster_gpus)
    return actors


def _check_actor_memory(config: JobConfig) -> None:
    """Refuses replicas whose reserved memory (actor_memory) a local Ray cannot hold all at once,
    where they would wait forever; on a cluster, warns that they wait for nodes."""
    if config.actor_memory is None:
        return
    memory = config.actor_memory.human_readable()
    largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
    available = ray.cluster_resources().get("memory", 0)
    if config.actor_memory > largest:
        text = (f"actor_memory = {memory}, but no node has that much memory for tasks and actors (the largest "
                f"{ByteSize(int(largest)).human_readable()})")
    elif config.num_actors * config.actor_memory > available:
        text = (f"num_actors x actor_memory = {config.num_actors} x {memory}, but Ray has "
                f"{ByteSize(int(available)).human_readable()} of memory for tasks and actors")
    else:
        return
    if started_here():
        raise UserError(f"{text} on this machine: lower actor_memory or num_actors, or leave actor_memory out")
    log.warning("%s now: the actors wait for nodes an autoscaler may add (a cluster without one never starts them)",
                text)


def _cpus_per_actor(config: JobConfig, gpus: float) -> float:
    """At most one CPU per actor, at least a quarter: the actors share what the manifest reader and
    the write tasks leave, and GPU actors also what one fetch and one render task need, so that no
    stage waits for a CPU (a write task that waits holds every result back) where the cluster has
    the CPUs: from about 6 per GPU with the default 4 replicas. Counted when the job starts: GPU
    workers that an autoscaler adds later bring CPUs that these shares leave to the other stages."""
    cpus = ray.cluster_resources().get("CPU", 1) - READER_CPUS - WRITE_CPUS * config.num_actors
    if gpus > 0:
        cpus -= FETCH_CPUS + RENDER_CPUS
    return max(0.25, min(1.0, cpus / config.num_actors))


def preflight(config: JobConfig, store: ResultsStore) -> Plan:
    """Checks everything that can be checked before work starts; writes and deletes nothing.

    The manifest (exists, readable, schema), the model (builds, weights load, layers resolve)
    and one trial explanation of random pictures on the driver's CPU.
    """
    options = config.storage_options
    if config.jpeg_decoder == "torchvision" and not torchvision_has_jpeg_decoder():
        raise ConfigError(f"jpeg_decoder: torchvision {torchvision.__version__} no longer decodes JPEGs; "
                          "use auto or pillow")
    try:
        manifest = validate_manifest(open_manifest(config.manifest, options))
    except StorageError as error:  # name the key
        raise type(error)(f"manifest {config.manifest}", error.reason) from error
    log.info("manifest %s: %d pairs, boxes: %s", redact_uri(config.manifest), manifest.num_rows, manifest.has_boxes)
    if manifest.folder_columns.num_columns and "path" in manifest.schema.names:  # _read_manifest's file column
        raise ManifestError("manifest column 'path' cannot be read beside Hive folder columns "
                            f"({', '.join(manifest.folder_columns.column_names)}=...); rename it")
    _check_some_images_exist(config, manifest.first_images)
    check_manifest_supports(config.gates, manifest.schema.names)
    explainer = build_explainer(config.model, options, device=torch.device("cpu"))  # GPUs belong to the actors
    explainer.trial()
    random_weights = random_weights_warning(config.model)  # once the model is known to build: not before an error
    if random_weights:
        log.warning("%s", random_weights)
    log.info("model %s checked: target layer %s", config.model.model_id, explainer.target_layer)
    layout = RunLayout(config.output, config.run_id, dt.datetime.now(dt.timezone.utc).date().isoformat(), new_attempt_id())
    return Plan(manifest=manifest, layout=layout, target_layer=str(explainer.target_layer), model=explainer.spec,
                previous_attempt=store.committed_attempt(config.run_id))


def _check_some_images_exist(config: JobConfig, uris: tuple[str, ...]) -> None:
    """Refuses a manifest none of whose first images (`uris`, ManifestInfo.first_images) exists: a
    path mistake (URIs relative to another folder than the manifest's), which would fail every row
    after the whole run. One missing image among others fails only its rows."""
    locations = [resolve_uri(uri, manifest_dir(config.manifest)) for uri in uris]
    if not any(exists(location, config.storage_options) for location in locations):
        relative = uris[0] != locations[0]
        raise ManifestError(f"none of the manifest's first {len(uris)} images exists, e.g. {uris[0]!r}"
                            + (f", looked for at {redact_uri(locations[0])}: relative URIs are read from the manifest's "
                               "folder" if relative else ""))


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


def decodes_jpegs_in_actors(config: JobConfig, gpus: float) -> bool:
    """Whether explain actors of `gpus` GPUs each decode the JPEGs (torchvision; nvJPEG on GPUs);
    `auto` never with a torchvision that no longer decodes them (preflight refuses `torchvision` then)."""
    automatic = config.jpeg_decoder == "auto" and gpus > 0 and torchvision_has_jpeg_decoder()
    return config.jpeg_decoder == "torchvision" or automatic


def build_dataset(config: JobConfig, layout: RunLayout, gpus: float, manifest: ManifestInfo) -> ray.data.Dataset:
    """The streaming pipeline from the manifest to result rows (not yet executed); `gpus` per actor."""
    options = config.storage_options
    cpus = _cpus_per_actor(config, gpus)
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
    warnings = tuple(warning for warning in (residual, empty_maps_warning(ok_rows), boxes_outside_warning(ok_rows))
                     if warning)
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
        """The committed run's first start, which a re-run keeps (run_history.first_started); this
        attempt's start when nothing is committed, or its record cannot be read."""
        if self.plan.previous_attempt is None:
            return self.base["timings"]["started"]
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
        record = self.record("running")
        write_json(self.plan.layout.attempt_record, record, self.config.storage_options)
        self._record_run_unless_committed(record)

    def failed(self, reason: str, summary: RunSummary | None = None) -> None:
        """The attempt's record says it failed; the run's record is the committed attempt's, if any."""
        record = self.record("failed", summary, reason)
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
        gpus = _gpus_per_actor(config)
        config = config.model_copy(update={"num_actors": _num_actors(config, gpus), "batch_size": batch_size_for(config, gpus)})
        _check_actor_memory(config)
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
    return Baseline(previous["run_id"], same_label_similarity(rows), f"against run {previous['run_id']}")
