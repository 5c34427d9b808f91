"""What the benchmarks share: the machine line of a report, a generated audit (images and a
top-k manifest), a local Ray, and interleaved timing. What SFAM is compared against: jobs/baselines.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.benchmark_report import cpu_name

Work = Callable[[], object]
MANIFEST_SCHEMA = pa.schema([("pair_id", pa.string()), ("query_uri", pa.string()), ("reference_uri", pa.string()),
                             ("rank", pa.int32()), ("score", pa.float32()), ("label", pa.int8())])


def write_top_k_audit(root: Path, queries: int, top_k: int, gallery: int, rng: np.random.Generator,
                      image: Callable[[], bytes], extension: str) -> list[dict]:
    """Query and gallery images under root/img (each `image()`), and root/pairs.parquet: each
    query's top-k, drawn from the gallery, with a label that is 1 for 30 % of pairs. Returns the rows."""
    (root / "img").mkdir(parents=True)
    for name, count in (("q", queries), ("g", gallery)):
        for i in range(count):
            (root / "img" / f"{name}{i}.{extension}").write_bytes(image())
    rows = [{"pair_id": f"q{q}/g{g}", "query_uri": f"img/q{q}.{extension}", "reference_uri": f"img/g{g}.{extension}",
             "rank": rank, "score": float(1 - rank / (top_k + 1)), "label": int(rng.random() < 0.3)}
            for q in range(queries)
            for rank, g in enumerate(rng.choice(gallery, size=top_k, replace=False).tolist(), start=1)]
    write_manifest(root / "pairs.parquet", rows)
    return rows


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously), so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(works: dict[str, Work], repeats: int,
                        device: torch.device = torch.device("cpu")) -> dict[str, list[tuple[float, float]]]:
    """One warm-up call of each work, then `repeats` rounds that call each work once: per work, the
    (wall, CPU) seconds of each round, `device` synchronised around every call.

    Interleaving the works makes slow changes in a shared machine's load hit them all alike.
    """
    for work in works.values():
        work()
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            synchronize(device)
            seconds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return seconds


def write_manifest(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)


@contextmanager
def local_ray() -> Iterator[None]:
    """A new local Ray on every core, without dashboard, progress bars or worker logs on the console
    (never a cluster that `ray start` left on this machine)."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def machine(threads: int, *packages: str) -> str:
    """CPU, cores, how busy they were when the run began, torch threads and versions."""
    load = os.getloadavg()[0]
    versions = ", ".join(f"{package} {_version(package)}" for package in ("torch", *packages))
    return (f"{cpu_name()}, {os.cpu_count()} cores shared with other work (load average {load:.1f} at the start), "
            f"{threads} torch threads, {versions}")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
