"""The audit job on Ray Data: manifest -> fetch -> explain (actor pool) -> render -> Parquet.

A re-run of a run_id rewrites it deterministically: its previous results partitions, PNGs
and run record are deleted first, so the table never holds a run's rows twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import resource
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy
from ray.data.datasource import FilenameProvider

from pipeline.config import JobConfig
from pipeline.distributed.stages import ExplainPairs, FetchImages, RenderResults
from pipeline.io.storage import exists, redact_uri, sha256_of
from pipeline.io.tables import arrow_filesystem, glob, open_input, read_results, remove_tree, write_json
from pipeline.layout import RunLayout
from pipeline.manifest import validate_manifest

log = logging.getLogger("sfam.audit")
PACKAGES = ("sfam-pipeline", "torch", "torchvision", "ray", "pyarrow", "fsspec", "s3fs", "pydantic", "pillow", "numpy")


class AuditFailed(RuntimeError):
    """The job ran but its result is not acceptable (too many failed rows)."""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    pairs: int
    ok: int
    error: int
    wall_seconds: float
    pairs_per_second: float
    forward_passes_per_pair: float
    devices: tuple[str, ...]
    results: str
    png: str | None
    run_record: str

    def lines(self) -> list[str]:
        return [
            f"run {self.run_id}: {self.pairs} pairs, {self.ok} ok, {self.error} error",
            f"{self.wall_seconds:.1f} s, {self.pairs_per_second:.1f} pairs/s, "
            f"{self.forward_passes_per_pair:.2f} forward passes per pair",
            f"explained on: {', '.join(self.devices) or 'nothing'}",
            f"results: {self.results}",
            *([f"overlays: {self.png}"] if self.png else []),
            f"run record: {self.run_record}",
        ]


class PartFiles(FilenameProvider):
    def __init__(self) -> None:
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}-{write_uuid}.parquet"


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _gpus_per_actor(config: JobConfig) -> float:
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else float(cluster_gpus >= 1)
    if gpus > 0 and config.num_actors * gpus > cluster_gpus:
        log.warning("%d actors x %g GPU each, but the cluster has %g GPU(s) now: the actors beyond that wait for "
                    "GPUs an autoscaler may add; num_actors = the number of GPUs runs without waiting",
                    config.num_actors, gpus, cluster_gpus)
    return gpus


def _cpus_per_actor(config: JobConfig, gpus: float) -> float:
    """One CPU per GPU actor; CPU actors share what the fetch and render tasks leave."""
    if gpus > 0:
        return 1.0
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (cpus - 1) / config.num_actors))


def clear_run(layout: RunLayout, config: JobConfig) -> None:
    """Deletes whatever an earlier attempt of this run_id wrote, under any run_date."""
    options = config.storage_options
    remove_tree(layout.success_marker, options)
    for partition in glob(f"{layout.results_root}/run_date=*/run_id={layout.run_id}", options):
        remove_tree(partition, options)
    remove_tree(layout.png_dir, options)
    remove_tree(layout.run_dir, options)


def _write_results(dataset: ray.data.Dataset, layout: RunLayout, config: JobConfig) -> None:
    """Runs the pipeline into the results partition.

    s3fs reports an endpoint that went down while Ray lists or reads the manifest as a
    missing file; the manifest was read moments before, so that is checked and said.
    """
    results_fs, results_path = arrow_filesystem(layout.results_dir, config.storage_options)
    try:
        dataset.write_parquet(results_path, filesystem=results_fs, filename_provider=PartFiles())
    except FileNotFoundError:
        exists(config.manifest, config.storage_options)  # raises StorageUnavailable when unreachable
        raise


def run_audit(config: JobConfig) -> RunSummary:
    """Runs one audit on the Ray cluster this process is connected to."""
    options = config.storage_options
    started = time.time()
    with open_input(config.manifest, options) as manifest_file:
        manifest = validate_manifest(manifest_file)
    log.info("manifest %s: %d pairs, boxes: %s", redact_uri(config.manifest), manifest.num_rows, manifest.has_boxes)

    layout = RunLayout(config.output, config.run_id, dt.datetime.now(dt.timezone.utc).date().isoformat())
    clear_run(layout, config)
    weights_sha256 = sha256_of(config.model.weights, options) if config.model.weights else None
    gpus = _gpus_per_actor(config)
    manifest_fs, manifest_path = arrow_filesystem(config.manifest, options)
    manifest_dir = config.manifest.rsplit("/", 1)[0] if "/" in config.manifest else "."

    # blocks of one batch of adjacent rows: every actor gets work (a one-file manifest reads as one
    # block), and the pairs of one query stay together, so their images are forwarded once
    dataset = ray.data.read_parquet(manifest_path, filesystem=manifest_fs, partitioning=None)
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)
    dataset = dataset.map_batches(
        FetchImages(manifest_dir, config.model.input_size, config.max_image_pixels, options),
        batch_size=config.batch_size, batch_format="pyarrow",
    )
    dataset = dataset.map_batches(
        ExplainPairs, fn_constructor_kwargs={"model": config.model, "storage_options": options},
        compute=ActorPoolStrategy(size=config.num_actors), num_gpus=gpus, num_cpus=_cpus_per_actor(config, gpus),
        batch_size=config.batch_size, batch_format="pyarrow",
    )
    dataset = dataset.map_batches(
        RenderResults(layout, config.render_png, options), batch_size=config.batch_size, batch_format="pyarrow"
    )
    log.info("explaining with %d actor(s), %g GPU each; results -> %s", config.num_actors, gpus, redact_uri(layout.results_dir))
    _write_results(dataset, layout, config)
    wall = time.time() - started

    written = read_results(layout.results_root, options, columns=["status", "forward_share", "device"], run_id=config.run_id)
    ok = int(pc.sum(pc.equal(written.column("status"), "ok")).as_py() or 0)
    errors = written.num_rows - ok
    summary = RunSummary(
        run_id=config.run_id, pairs=written.num_rows, ok=ok, error=errors, wall_seconds=wall,
        pairs_per_second=written.num_rows / wall,
        forward_passes_per_pair=float(pc.sum(written.column("forward_share")).as_py() or 0) / max(ok, 1),
        devices=tuple(sorted(pc.unique(written.column("device")).drop_null().to_pylist())),
        results=redact_uri(layout.results_dir), png=redact_uri(layout.png_dir) if config.render_png else None,
        run_record=redact_uri(layout.run_record),
    )
    error_fraction = errors / max(written.num_rows, 1)
    failed = error_fraction > config.max_error_fraction
    record = {
        "run_id": config.run_id,
        "run_date": layout.run_date,
        "status": "failed" if failed else "succeeded",
        "config": config.model_dump(mode="json"),
        "model_id": config.model.model_id,
        "weights_sha256": weights_sha256,
        "versions": _versions(),
        "counts": {"pairs": written.num_rows, "ok": ok, "error": errors, "manifest_rows": manifest.num_rows},
        "timings": {"started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
                    "wall_seconds": wall, "pairs_per_second": summary.pairs_per_second},
        "forward_passes_per_pair": summary.forward_passes_per_pair,
        "resources": {"gpus_per_actor": gpus, "num_actors": config.num_actors, "devices": list(summary.devices),
                      "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    record["config"]["manifest"] = redact_uri(config.manifest)
    record["config"]["output"] = redact_uri(config.output)
    write_json(layout.run_record, record, options)
    if written.num_rows != manifest.num_rows:
        raise AuditFailed(f"{written.num_rows} result rows for {manifest.num_rows} manifest rows")
    if failed:
        raise AuditFailed(
            f"{errors} of {written.num_rows} pairs failed ({error_fraction:.1%} > max_error_fraction "
            f"{config.max_error_fraction:.1%}); see the error column of {summary.results}"
        )
    write_json(layout.success_marker, {"run_id": config.run_id, **asdict(summary)}, options)
    return summary
