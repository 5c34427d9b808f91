"""The whole job against one process that only decodes, side by side, and where the job's time goes.

    python -m jobs.bench_job [--queries 96] [--top-k 10] [--gallery 480] [--rounds 3] [--arch ARCH]
                             [--timed-pairs N] [--smoke] [--write]

One generated audit: 640x480 JPEGs (queries, each with its top-k drawn from a gallery), a tiny
model (jobs/tiny_model.py, so explaining costs almost nothing; `--arch` names another) and the
default render policy. A first run of the job on half the manifest starts Ray's task workers.
Each round runs a single process that only reads, decodes and resizes both images of each pair
(what the job's fetch does, without the job), the job's explain stage alone in this process on
the same batches (on a GPU where there is one), then the whole job (run_audit on a local Ray with
every core and GPU) on the same manifest, so that a shared machine's load hits them alike: the
job's pairs/s over decode-only's is the target on a CPU, over explain-only's on a GPU. While
the job runs, the CPU time of every process (the driver, Ray's own processes, the workers) is
sampled; the job's stages are timed again in this process on the same batches, and what the job
spends beyond them is Ray's overhead. The job's steady state is
its marginal rate: each round also runs the job on the first half of the manifest, and the
second half's pairs, wall time and CPU are the full run's less the half run's (start-up and
commit cancel out).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, get_args

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.bench_common import local_ray, machine, synchronize, write_manifest, write_top_k_audit
from jobs.bench_stages import photo_jpeg
from jobs.benchmark_report import BENCHMARKS, markdown, parse_benchmark_args, verdict, write_section
from jobs.tiny_model import tiny_spec
from pipeline.config import MAX_IMAGE_PIXELS, JobConfig
from pipeline.io.images import decode_pictures
from pipeline.io.storage import StorageOptions
from pipeline.models.spec import ModelSpec

if TYPE_CHECKING:
    from pipeline.distributed.explain import ExplainPairs
    from pipeline.distributed.run_record import RunSummary

SECTION = "## Where the job's time goes"
SMOKE = {"queries": 4, "top_k": 2, "gallery": 8, "rounds": 1, "batch_size": 2}
DRIVER, WORKERS, RAY = "driver", "Ray workers running the stages", "Ray's own processes"
STAGE_NAMES = ("FetchImages", "ExplainPairs", "RenderResults", "StageChain", "Write")  # in a worker's process title while it runs one
RUNNING = ").submit"  # ends an actor's process title while it runs a batch: ray::MapWorker(MapBatches(StageChain)).submit
TARGET = 1.0  # the job's pairs/s over the decode-only process's
GPU_TARGET = 0.8  # on a GPU: the job's steady pairs/s over the explain stage's alone in one process
T = TypeVar("T")
GPU_BUSY = 0.8
EXPLAIN_ONLY_PAIRS = 4_096  # the most the explain-only row times: it holds their pixels, 0.7 MB a pair at 224 px
GPU_PAIRS_PER_SECOND = {  # model -> (SFAM pairs/s at 224 px, where the figure comes from: BENCHMARKS.md, Speed)
    "resnet50": (2_700.0, "measured on an H100"),
    # the generic path at the default layer (a backward through every block): FLOPs would say 629
    "vit_b_16": (244.0, "measured on an H200, `encoder.dropout`, generic path"),
}


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """A generated audit: its manifest, and the folder its relative image URIs resolve against."""

    root: Path
    manifest: Path
    pairs: int
    half_manifest: Path  # the manifest's first half of rows: the marginal rate is the job's steady state


def write_audit(root: Path, queries: int, top_k: int, gallery: int, image_size: tuple[int, int],
                rng: np.random.Generator) -> Audit:
    """Query and gallery JPEGs of `image_size` (width, height), a manifest of each query's top-k and its first half."""
    rows = write_top_k_audit(root, queries, top_k, gallery, rng, lambda: photo_jpeg(rng, *image_size), "jpg")
    half_manifest = root / "half.parquet"
    write_manifest(half_manifest, rows[: len(rows) // 2])
    return Audit(root, root / "pairs.parquet", len(rows), half_manifest)


def job_config(audit: Audit, run_id: str, model: ModelSpec, **overrides: object) -> JobConfig:
    """The job's defaults (batch size, actors, render policy) on the audit, explaining with `model`."""
    return JobConfig.model_validate({"manifest": str(audit.manifest), "output": str(audit.root / "audits"),
                                     "run_id": run_id, "model": model.model_dump(), "max_error_fraction": 0.0,
                                     **overrides})


def model_spec(arch: str | None) -> ModelSpec:
    """The tiny model, or `arch` (torchvision or timm/<name>) with random weights and a 512-d head, at 224 px."""
    return tiny_spec() if arch is None else ModelSpec(arch=arch, embedding_dim=512, input_size=224)


def gpu_share(summary: RunSummary) -> str:
    return f" of {summary.gpus_per_actor:g} GPU each" if summary.gpus_per_actor else ""


def model_name(spec: ModelSpec) -> str:
    return "tiny model (jobs/tiny_model.py)" if spec.arch == tiny_spec().arch else f"{spec.arch}, random weights"


# -- CPU time and memory of the job's processes ---------------------------------------------------


@contextmanager
def every(interval_s: float, action: Callable[[], None]) -> Iterator[None]:
    """Runs `action` in a background thread when the block starts, every `interval_s` seconds, and when it ends."""
    done = threading.Event()

    def repeat() -> None:
        action()
        while not done.wait(interval_s):
            action()
        action()

    thread = threading.Thread(target=repeat, name="every", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@dataclass(frozen=True)
class Sample:
    """At `at` (time.time()): CPU seconds so far and, when sampled, USS bytes, per process group."""

    at: float
    cpu: dict[str, float]
    uss: dict[str, int]


@dataclass
class ProcessMonitor:
    """Samples, in a background thread, the driver (this process) and every process under it.

    Groups: the driver (less the monitor's own thread), the Ray workers once they run a stage of
    the job, and Ray's own processes (raylet, GCS, agents, Ray Data's helper actors and tasks,
    workers before their first stage). The CPU time a process used since the previous sample
    goes to its group of the moment, so a worker that exits keeps what it was counted.
    """

    interval_s: float = 0.5
    uss: bool = False  # memory_full_info reads /proc/PID/smaps: slow, so only where asked
    samples: list[Sample] = field(default_factory=list)
    first_batch_at: float | None = None  # the first sample that saw an actor run a batch
    _seen: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds at the previous sample
    _cpu: dict[str, float] = field(default_factory=dict)  # group -> CPU seconds
    _stage_workers: set[int] = field(default_factory=set)

    @contextmanager
    def watching(self) -> Iterator[ProcessMonitor]:
        with every(self.interval_s, lambda: self.samples.append(self._sample())):
            yield self

    def _sample(self) -> Sample:
        driver = psutil.Process()
        uss: dict[str, int] = {}
        for process in [driver, *driver.children(recursive=True)]:
            try:
                group = self._group(process, driver)
                times = process.cpu_times()
                own = time.thread_time() if process.pid == driver.pid else 0.0
                seconds = times.user + times.system - own
                if self.uss:
                    uss[group] = uss.get(group, 0) + process.memory_full_info().uss
            except psutil.Error:  # exited meanwhile
                continue
            self._cpu[group] = self._cpu.get(group, 0.0) + seconds - self._seen.get(process.pid, 0.0)
            self._seen[process.pid] = seconds
        return Sample(time.time(), dict(self._cpu), uss)

    def _group(self, process: psutil.Process, driver: psutil.Process) -> str:
        if process.pid == driver.pid:
            return DRIVER
        title = " ".join(process.cmdline())
        if self.first_batch_at is None and title.rstrip().endswith(RUNNING):
            self.first_batch_at = time.time()
        if any(stage in title for stage in STAGE_NAMES):
            self._stage_workers.add(process.pid)
        return WORKERS if process.pid in self._stage_workers else RAY

    def cpu_at(self, moment: float) -> dict[str, float]:
        """CPU seconds per group at `moment`, interpolated between samples."""
        times = [s.at for s in self.samples]
        groups = {group for s in self.samples for group in s.cpu}
        return {group: float(np.interp(moment, times, [s.cpu.get(group, 0.0) for s in self.samples]))
                for group in groups}

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group from `start` to `end`."""
        return less(self.cpu_at(end), self.cpu_at(start))


def less(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """a - b per group (a group missing from b counts 0)."""
    return {group: seconds - b.get(group, 0.0) for group, seconds in a.items()}


# -- the job --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRun:
    """One run of the whole job, its part files' timeline and its processes' CPU time."""

    summary: RunSummary
    started: float
    finished: float
    parts: list[tuple[float, int]]  # (mtime, rows) of each result file, in time order
    monitor: ProcessMonitor

    @property
    def seconds(self) -> float:
        """Wall time of run_audit."""
        return self.finished - self.started

    @property
    def pairs_per_second(self) -> float:
        return self.summary.pairs / self.seconds

    @property
    def first_result(self) -> float:
        """Seconds from the start of run_audit to the first result file."""
        return self.parts[0][0] - self.started

    @property
    def first_batch(self) -> float:
        """Seconds from the start of run_audit to the first sample that saw an actor run a batch."""
        return (self.monitor.first_batch_at or self.parts[0][0]) - self.started

    def cpu(self) -> dict[str, float]:
        """CPU seconds per process group from the start of run_audit to its return."""
        return self.monitor.cpu_between(self.started, self.finished)

    def startup_cpu(self) -> float:
        """CPU seconds of all processes from the start of run_audit to the first result file."""
        return sum(self.monitor.cpu_between(self.started, self.parts[0][0]).values())


def result_parts(output: Path, attempt: str) -> list[tuple[float, int]]:
    """(mtime, rows) of the attempt's Parquet part files, wherever the store keeps them."""
    files = sorted(output.rglob(f"part-{attempt}-*.parquet"), key=lambda f: f.stat().st_mtime)
    return [(f.stat().st_mtime, pq.ParquetFile(f).metadata.num_rows) for f in files]


def run_job(config: JobConfig, monitor: ProcessMonitor) -> JobRun:
    """run_audit on the Ray this process is connected to, watched by `monitor`."""
    from pipeline.distributed.job import run_audit

    with monitor.watching():
        started = time.time()
        summary = run_audit(config)
        finished = time.time()
    return JobRun(summary, started, finished, result_parts(Path(config.output), summary.attempt), monitor)


# -- in one process -------------------------------------------------------------------------------


def decode_only(audit: Audit, size: int, pairs: int | None) -> float:
    """Pairs/s of one process that reads, decodes and resizes both images of each of the manifest's
    first `pairs` pairs (all by default), as the job's fetch does."""
    from pipeline.render.result_row import DISPLAY_SIDE

    rows = pq.read_table(audit.manifest, columns=["query_uri", "reference_uri"]).slice(0, pairs).to_pylist()
    started = time.perf_counter()
    for row in rows:
        for uri in row.values():
            decode_pictures((audit.root / uri).read_bytes(), uri, MAX_IMAGE_PIXELS, size, DISPLAY_SIDE)
    return len(rows) / (time.perf_counter() - started)


DECODE = ("decode: decode_pictures of each distinct image of a batch (with jpeg_decoder torchvision: its header check, "
          "torchvision_jpeg; the actors decode, in explain)")
FETCH_REST = "fetch besides decoding: reading the files, Arrow columns"
EXPLAIN = "explain: ExplainPairs (model tensors, SFAM, result columns)"
RENDER = "render: RenderResults, default policy (flagged)"
WRITE = "Parquet write of the result rows (pyarrow, files as large as the job's)"


@dataclass(frozen=True)
class StageCosts:
    ms_per_pair: dict[str, float]  # CPU ms per pair of each stage, in pipeline order
    overlays: int
    pairs: int


def stage_costs(audit: Audit, config: JobConfig, folder: Path, pairs: int | None) -> StageCosts:
    """The job's stages on its batches of the manifest's first `pairs` pairs (all by default), one
    after another in this process on one torch thread."""
    from pipeline.distributed.explain import ExplainPairs
    from pipeline.distributed.fetch import FetchImages
    from pipeline.distributed.render import RenderResults
    from pipeline.distributed.resources import decodes_jpegs_in_actors
    from pipeline.io.images import torchvision_jpeg
    from pipeline.layout import RunLayout
    from pipeline.render.result_row import DISPLAY_SIDE
    from pipeline.render.selection import select_for_render

    torch.set_num_threads(1)  # as in an actor of the job with one CPU or less
    options = StorageOptions()
    in_actors = decodes_jpegs_in_actors(config, float(torch.cuda.is_available()))
    fetch = FetchImages(str(audit.root), config.model.input_size, config.max_image_pixels, options, decode_jpegs=not in_actors)
    explain = ExplainPairs(config.model, options, "bench", config.max_image_pixels)
    render = RenderResults(RunLayout(str(folder), "bench", "2026-01-01", "bench"), config.render_png, config.render_flags, options)
    seconds = dict.fromkeys((DECODE, FETCH_REST, EXPLAIN, RENDER, WRITE), 0.0)
    manifest, overlays, unwritten = pq.read_table(audit.manifest).slice(0, pairs), 0, []

    def timed(name: str, work: Callable[..., T], *args: object) -> T:
        started = time.process_time()
        result = work(*args)
        seconds[name] += time.process_time() - started
        return result

    for offset in range(0, manifest.num_rows, config.batch_size):
        batch = manifest.slice(offset, config.batch_size)
        for uri in {*batch.column("query_uri").to_pylist(), *batch.column("reference_uri").to_pylist()}:
            if in_actors:
                timed(DECODE, torchvision_jpeg, (audit.root / uri).read_bytes(), uri, MAX_IMAGE_PIXELS)
            else:
                timed(DECODE, decode_pictures, (audit.root / uri).read_bytes(), uri, MAX_IMAGE_PIXELS,
                      config.model.input_size, DISPLAY_SIDE)
        explained = timed(EXPLAIN, explain, timed(FETCH_REST, fetch, batch))
        overlays += int(select_for_render(explained, config.render_png, config.render_flags).sum())
        unwritten.append(timed(RENDER, render, explained))
        if sum(t.num_rows for t in unwritten) >= config.rows_per_file or offset + config.batch_size >= manifest.num_rows:
            timed(WRITE, pq.write_table, pa.concat_tables(unwritten), folder / f"part-{offset}.parquet")
            unwritten = []
    seconds[FETCH_REST] -= seconds[DECODE]  # the fetch decoded the same images again
    return StageCosts({name: 1000 * s / manifest.num_rows for name, s in seconds.items()}, overlays, manifest.num_rows)


@dataclass(frozen=True)
class ExplainOnly:
    """The job's explain stage alone in this process, on the device an actor would use, on batches
    fetched beforehand: what the job's pairs/s is compared with on a GPU."""

    explain: ExplainPairs
    batches: list[pa.Table]  # fetched: pixels in the transient columns

    @classmethod
    def prepare(cls, audit: Audit, config: JobConfig, pairs: int | None) -> ExplainOnly:
        """On the manifest's first `pairs` pairs (all by default), EXPLAIN_ONLY_PAIRS at most."""
        from pipeline.distributed.explain import ExplainPairs
        from pipeline.distributed.fetch import FetchImages

        options = StorageOptions()
        fetch = FetchImages(str(audit.root), config.model.input_size, config.max_image_pixels, options)
        manifest = pq.read_table(audit.manifest).slice(0, min(pairs or audit.pairs, EXPLAIN_ONLY_PAIRS))
        batches = [fetch(manifest.slice(offset, config.batch_size)) for offset in range(0, manifest.num_rows, config.batch_size)]
        return cls(ExplainPairs(config.model, options, "bench", config.max_image_pixels), batches)

    @property
    def pairs(self) -> int:
        return sum(batch.num_rows for batch in self.batches)

    @property
    def on_gpu(self) -> bool:
        return self.explain.explainer.device.type == "cuda"

    def pairs_per_second(self) -> float:
        device = self.explain.explainer.device
        self.explain(self.batches[0])  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for batch in self.batches:
            self.explain(batch)
        synchronize(device)
        return self.pairs / (time.perf_counter() - started)


# -- report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    decode: float  # pairs/s of decode_only
    explain: float  # pairs/s of ExplainOnly
    job: JobRun
    half_job: JobRun  # the same job on the first half of the manifest

    @property
    def ratio(self) -> float:
        return self.job.pairs_per_second / self.decode

    @property
    def steady_rows(self) -> int:
        """The second half's pairs: the full run's less the half run's."""
        return self.job.summary.pairs - self.half_job.summary.pairs

    @property
    def steady_seconds(self) -> float:
        return max(self.job.seconds - self.half_job.seconds, 1e-9)

    @property
    def steady_rate(self) -> float:
        return self.steady_rows / self.steady_seconds

    @property
    def steady_ratio(self) -> float:
        return self.steady_rate / self.decode

    @property
    def gpus_used(self) -> float:
        """GPUs the job's actors held (at least 1): explain-only runs on one, the job on them all."""
        summary = self.job.summary
        return max(1.0, min(summary.num_actors * summary.gpus_per_actor, float(torch.cuda.device_count())))

    @property
    def whole_explain_ratio(self) -> float:
        return self.job.pairs_per_second / (self.explain * self.gpus_used)

    @property
    def steady_explain_ratio(self) -> float:
        return self.steady_rate / (self.explain * self.gpus_used)

    def steady_cpu(self) -> dict[str, float]:
        """CPU seconds per process group of the second half: the full run's less the half run's."""
        return less(self.job.cpu(), self.half_job.cpu())

    @property
    def steady_cores(self) -> float:
        """CPU cores that all the job's processes kept busy in its steady state."""
        return sum(self.steady_cpu().values()) / self.steady_seconds


def rounds_table(rounds: list[Round], on_gpu: bool, tiny_model: bool) -> str:
    """Per round: the in-process rows, the whole job and its steady state; then the ratios' medians,
    with their targets: decode-only's with the tiny model, explain-only's (times the GPUs the job
    used) on a GPU."""
    explain_where = "GPU" if on_gpu else "CPU"
    per_round = markdown(
        ["round", "decode-only, 1 process", f"explain-only, 1 process ({explain_where})", "whole job (run_audit)",
         "job, steady state", "steady: CPU cores busy", "job: first result after", "job: CPU until then"],
        [[str(number), f"{r.decode:,.0f} pairs/s", f"{r.explain:,.0f} pairs/s", f"{r.job.pairs_per_second:,.1f} pairs/s",
          f"{r.steady_rate:,.0f} pairs/s", f"{r.steady_cores:.1f}", f"{r.job.first_result:.1f} s",
          f"{r.job.startup_cpu():.1f} s"] for number, r in enumerate(rounds, start=1)])

    def median(name: str) -> float:
        return statistics.median(getattr(r, name) for r in rounds)

    decode_target = TARGET if tiny_model else None
    explain_target = GPU_TARGET if on_gpu else None
    ratios = [("whole job ÷ decode-only", median("ratio"), decode_target),
              ("job in steady state ÷ decode-only", median("steady_ratio"), decode_target),
              ("whole job ÷ explain-only", median("whole_explain_ratio"), None),
              ("job in steady state ÷ explain-only", median("steady_explain_ratio"), explain_target)]
    medians = markdown(["ratio (median over rounds, pairs/s)", "value", "target", ""],
                       [[name, f"{value:.2f}", "" if target is None else f">= {target}",
                         verdict(None if target is None else value >= target)] for name, value, target in ratios])
    return f"{per_round}\n\n{medians}"


def startup_table(fresh: JobRun, rounds: list[Round]) -> str:
    """Where the time before the first result file goes: in the run on a fresh Ray (the warm-up,
    which starts Ray's task workers, as every job on a new cluster does) and in each round's full run."""
    runs = [("on a fresh Ray (the warm-up, half the manifest)", fresh),
            *((f"round {number}", r.job) for number, r in enumerate(rounds, start=1))]
    return markdown(
        ["run", "pre-flight check (driver)", "then Ray Data starts the actors, until one runs a batch",
         "then until the first result file", "first result after", "CPU until then, all processes"],
        [[name, f"{job.summary.preflight_seconds:.1f} s", f"{job.first_batch - job.summary.preflight_seconds:.1f} s",
          f"{job.first_result - job.first_batch:.1f} s", f"{job.first_result:.1f} s", f"{job.startup_cpu():.1f} s"]
         for name, job in runs])


def steady_ms_per_pair(measured: Round) -> dict[str, float]:
    """CPU ms per pair of each process group in the job's steady state."""
    return {group: 1000 * seconds / max(measured.steady_rows, 1) for group, seconds in measured.steady_cpu().items()}


def ray_overhead(stages: StageCosts, measured: Round) -> float:
    """CPU ms per pair that the job spends beyond its stages run in one process."""
    return sum(steady_ms_per_pair(measured).values()) - sum(stages.ms_per_pair.values())


def breakdown_table(stages: StageCosts, measured: Round, batch_size: int) -> str:
    """CPU ms per pair: each stage in one process, then the job's steady state by process group."""
    per_pair = steady_ms_per_pair(measured)
    stage_sum, job_sum = sum(stages.ms_per_pair.values()), sum(per_pair.values())
    overhead = ray_overhead(stages, measured)
    return markdown(["where (CPU time per pair)", "ms/pair"], [
        *([name, f"{ms:.2f}"] for name, ms in stages.ms_per_pair.items()),
        [f"**the stages in one process** ({stages.overlays} overlays for {stages.pairs} pairs)", f"**{stage_sum:.2f}**"],
        [f"**the whole job, steady state, all processes** (the second half's {measured.steady_rows} pairs in "
         f"{measured.steady_seconds:.1f} s)", f"**{job_sum:.2f}**"],
        *([f"&nbsp;&nbsp;{group}", f"{per_pair.get(group, 0.0):.2f}"] for group in (WORKERS, DRIVER, RAY)),
        ["**Ray's overhead: the job less its stages**",
         f"**{overhead:.2f}** ({overhead * batch_size:.0f} ms per batch of {batch_size})"],
    ])


def projection_table(stages: StageCosts, measured: Round) -> str:
    """CPU cores that keep a GPU busy, from this run's CPU costs per pair and each model's GPU pairs/s."""
    cpu = stages.ms_per_pair
    feeding = cpu[DECODE] + cpu[FETCH_REST] + cpu[RENDER] + cpu[WRITE] + ray_overhead(stages, measured)
    rows = []
    for model, (rate, source) in GPU_PAIRS_PER_SECOND.items():
        busy = GPU_BUSY * rate / 1000  # pairs per ms at the target utilisation
        rows.append([model, f"{rate:,.0f} ({source})", f"{feeding:.2f}", f"{busy * feeding:.1f}", f"{busy * cpu[EXPLAIN]:.1f}"])
    return markdown(["model at 224 px", "GPU pairs/s, SFAM in one process (on the GPU named)",
                     "CPU ms per pair: fetch, render, write, Ray", f"cores for {GPU_BUSY:.0%} busy",
                     f"explain actors' own CPU ({cpu[EXPLAIN]:.2f} ms per pair at most): cores"], rows)


def section(command: str, args: argparse.Namespace, audit: Audit, fresh: JobRun, rounds: list[Round],
            stages: StageCosts, config: JobConfig, explain_only: ExplainOnly) -> str:
    timed = min(args.timed_pairs or audit.pairs, audit.pairs)
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {machine(1, 'ray')}  ",
        f"Audit: {audit.pairs} pairs of 640x480 JPEGs ({args.queries} queries x top-{args.top_k} from a gallery of "
        f"{args.gallery}), {model_name(config.model)} at {config.model.input_size} px, batch {config.batch_size}, "
        f"{rounds[-1].job.summary.num_actors} actors{gpu_share(rounds[-1].job.summary)}, render policy {config.render_png}, "
        f"jpeg_decoder {config.jpeg_decoder}",
        "", rounds_table(rounds, explain_only.on_gpu, args.arch is None), "", startup_table(fresh, rounds), "",
        breakdown_table(stages, rounds[-1], config.batch_size), "",
        projection_table(stages, rounds[-1]), "",
        "A first run of the job on the manifest's first half starts Ray's task workers (as on a cluster that "
        "has run a job). Each round runs the decode-only process, the explain stage alone (ExplainPairs on the batches the job's "
        "fetch makes, fetched beforehand), then the job, then the job on the manifest's first half, on "
        "the same files"
        + (f"; the in-process rows and the stage rows time the manifest's first {timed:,} pairs"
           if timed < audit.pairs else "")
        + (f"; the explain-only row times the first {explain_only.pairs:,} pairs (it holds their pixels)"
           if explain_only.pairs < timed else "")
        + ". The whole job's pairs/s counts everything from run_audit's start (pre-flight check, "
        "Ray Data starting its workers and actors, commit); the steady state is the marginal rate: the second "
        "half's pairs over the full run's time less the half run's. Stage rows: the job's stage classes run in this process on the job's batches "
        "(decoding is timed on its own, then subtracted from the fetch); the job's rows: CPU time of "
        "every process, sampled every 0.5 s, the full run's less the half run's, in the last round. "
        "Projection: the CPU work per pair that does not run on the GPU (decoding, the rest of the fetch, "
        "rendering, writing, Ray's overhead as measured here) at the GPU's pairs/s, times the share of time "
        "the GPU should be busy; the explain actors' own CPU per pair is at most what the tiny model's "
        "explanation costs on the CPU here (on a GPU its tensors are made on the GPU).",
    ]) + "\n"


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_job", description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--gallery", type=int, default=480, help="gallery images the top-k are drawn from")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of decode-only, the job, the job on half the manifest")
    parser.add_argument("--batch-size", type=int, default=JobConfig.model_fields["batch_size"].default,
                        help="the job's batch_size (default: the job's default, 128 with GPUs, 32 without)")
    parser.add_argument("--arch", help="the job's model: a torchvision or timm/<name> arch, random weights, 512-d "
                        "embedding (default: the tiny model)")
    parser.add_argument("--timed-pairs", type=positive, help="pairs that the in-process and stage rows time (default: "
                        f"all; the explain-only row at most {EXPLAIN_ONLY_PAIRS:,})")
    parser.add_argument("--num-actors", type=int, help="the job's num_actors (default: the job's default)")
    parser.add_argument("--gpus-per-actor", type=float, help="the job's gpus_per_actor (default: the job's, 0.25 where there are GPUs)")
    decoder = JobConfig.model_fields["jpeg_decoder"]
    parser.add_argument("--jpeg-decoder", choices=get_args(decoder.annotation), default=decoder.default,
                        help="the job's jpeg_decoder (default: auto, torchvision's nvJPEG in the actors where they hold GPUs)")
    args = parse_benchmark_args(parser, argv, SMOKE, SECTION)
    if args.gallery < args.top_k:
        parser.error("--gallery must hold at least --top-k images")
    if args.gpus_per_actor == 0 and torch.cuda.is_available():
        parser.error("--gpus-per-actor 0 on a machine with a GPU: explain-only would run on the GPU, the job on CPUs")
    return args


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    from pipeline.distributed.resources import batch_size_for

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as folder:
        audit = write_audit(Path(folder) / "audit", args.queries, args.top_k, args.gallery, (640, 480),
                            np.random.default_rng(0))
        config = job_config(audit, "bench-job", model_spec(args.arch), batch_size=args.batch_size,
                            num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor, jpeg_decoder=args.jpeg_decoder)
        # the job's default batch where its actors hold GPUs: there are some exactly where CUDA is here (parse_args)
        config = config.model_copy(update={"batch_size": batch_size_for(config, float(torch.cuda.is_available()))})
        stages = stage_costs(audit, config, Path(folder) / "stages", args.timed_pairs)
        explain_only = ExplainOnly.prepare(audit, config, args.timed_pairs)
        half = config.model_copy(update={"manifest": str(audit.half_manifest)})
        with local_ray():
            # starts the processes that Ray keeps for tasks (one that fetches imports torch: seconds of CPU), as a
            # cluster that has run a job has them: else the first full run's steady state counts them
            fresh = run_job(half.model_copy(update={"run_id": "bench-job-warm-up"}), ProcessMonitor())
            rounds = [Round(decode_only(audit, config.model.input_size, args.timed_pairs), explain_only.pairs_per_second(),
                            run_job(config.model_copy(update={"run_id": f"bench-job-{n}"}), ProcessMonitor()),
                            run_job(half.model_copy(update={"run_id": f"bench-job-half-{n}"}), ProcessMonitor()))
                      for n in range(args.rounds)]
    report = "\n\n".join([rounds_table(rounds, explain_only.on_gpu, args.arch is None), startup_table(fresh, rounds),
                          breakdown_table(stages, rounds[-1], config.batch_size), projection_table(stages, rounds[-1])])
    print(report)
    if args.write:
        command = shlex.join(["python", "-m", "jobs.bench_job", *argv])
        write_section(BENCHMARKS, section(command, args, audit, fresh, rounds, stages, config, explain_only))
        print(f"\nwrote the {SECTION} section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
