"""Speed of SFAM against a bare forward pass, pytorch-grad-cam's GradCAM and the whole Ray job.

    python -m jobs.bench_speed [--archs resnet50 vit_b_16] [--device cpu|cuda] [--batch 32] [--repeats 3]
                               [--size 224] [--target-layer ARCH=LAYER ...] [--skip-job] [--write]

Every row runs in one process on the same inputs: pairs of a generated retrieval manifest
(random smooth pictures, each query with its top-k from a gallery), decoded as the job decodes
them. Each arch of `--archs` gets the four in-process rows (bare forward, SFAM with the default
`cis` weighting, SFAM `matched`, GradCAM) at the explainer's default target layer (ResNet: `layer4`, fast path; class-token ViT: the tokens entering the first block, generic path) or the one `--target-layer` names, GradCAM
with a `reshape_transform` for token layers. On a shared, noisy machine the ratios between
rows mean more than the absolute numbers. `--smoke` is a tiny run for the tests; `--write`
puts the table into BENCHMARKS.md (`## Speed`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import shlex
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch
from PIL import Image
from torch import nn

from jobs.baselines import concept_maps, library_cam, resolve
from jobs.bench_common import Work, interleaved_seconds, local_ray, machine, write_top_k_audit
from jobs.benchmark_report import BENCHMARKS, markdown, parse_benchmark_args, verdict, write_section
from pipeline import SFAM
from pipeline.config import JobConfig
from pipeline.io.images import decode_image, resize_for_model, to_model_tensor
from pipeline.models.loading import build_model
from pipeline.models.spec import ModelSpec

if TYPE_CHECKING:
    from pipeline.distributed.run_record import RunSummary

METRIC = "cosine"
EMBEDDING_DIM = 512
IMAGE_SIZE = (256, 192)  # width, height of the generated pictures
SMOKE = {"archs": ["resnet18", "timm/vit_tiny_patch16_224"], "size": 64, "batch": 4, "repeats": 1, "job_queries": 5,
         "job_top_k": 2, "job_gallery": 10}

BARE = "bare forward (inference_mode)"
SFAM_ROW = "SFAM, both maps per pair"
MATCHED_ROW = "SFAM matched (weighting=\"matched\"), both maps and correspondences per pair"
GRADCAM = "pytorch-grad-cam GradCAM, both images per pair"
JOB = "whole Ray job (decode, explain, PNG, Parquet)"
FORWARDS = "job forward passes per pair"
DRIVER_RSS = "job driver peak RSS"
WORKER_RSS = "largest Ray worker peak RSS"
WORKERS_RSS = "Ray workers' peak total RSS"


@dataclass(frozen=True)
class Rate:
    """Items per second: the median over the timed repeats, and the slowest and fastest repeat."""

    median: float
    low: float
    high: float


@dataclass(frozen=True)
class Pairs:
    """A generated audit: the manifest's rows and the folder its relative URIs resolve against."""

    root: Path
    manifest: Path
    rows: list[dict]


@dataclass
class WorkerMemory:
    """Polls, in a background thread, the RSS of the raylet's "ray::" children of this process."""

    interval_s: float = 0.2
    peak_per_process: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (title, bytes)
    peak_total: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def watching(self) -> Iterator[WorkerMemory]:
        thread = threading.Thread(target=self._poll, name="worker-memory", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _poll(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def _sample(self) -> None:
        total = 0
        for process in _ray_workers():
            try:
                title, rss = " ".join(process.cmdline()).strip(), process.memory_info().rss
            except psutil.Error:  # the worker exited meanwhile
                continue
            total += rss
            old_title, old_rss = self.peak_per_process.get(process.pid, (title, 0))
            named = old_title if title == "ray::IDLE" else title  # keep the name of its last real work
            self.peak_per_process[process.pid] = (named, max(old_rss, rss))
        self.peak_total = max(self.peak_total, total)


def _ray_workers() -> list[psutil.Process]:
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "raylet":
                workers += [c for c in process.children() if "ray::" in " ".join(c.cmdline())]
        except psutil.Error:
            continue
    return workers


@dataclass(frozen=True)
class JobResult:
    summary: RunSummary
    arch: str
    actors: int
    driver_peak_bytes: int
    workers: WorkerMemory


# -- inputs -------------------------------------------------------------------------------------


def smooth_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Random colours on a coarse grid, upsampled: a picture, not noise, as decoding goes."""
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def write_pairs(root: Path, queries: int, top_k: int, gallery: int, rng: np.random.Generator) -> Pairs:
    """Query and gallery PNGs, and a manifest of each query's top-k drawn from the gallery."""

    def png() -> bytes:
        buffer = io.BytesIO()
        smooth_picture(rng, *IMAGE_SIZE).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = write_top_k_audit(root, queries, top_k, gallery, rng, png, "png")
    return Pairs(root, root / "pairs.parquet", rows)


def load_inputs(pairs: Pairs, batch: int, spec: ModelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` pairs of the manifest (cycled if shorter), decoded as the job decodes them."""
    def images(column: str) -> torch.Tensor:
        uris = [pairs.rows[i % len(pairs.rows)][column] for i in range(batch)]
        pixels = np.stack([resize_for_model(decode_image((pairs.root / uri).read_bytes(), uri, 10**8), spec.input_size)
                           for uri in uris])
        return to_model_tensor(pixels, spec.mean, spec.std, device)
    return images("query_uri"), images("reference_uri")


# -- in-process rows ----------------------------------------------------------------------------


def measure_side_by_side(works: dict[str, Work], items: int, repeats: int, device: torch.device) -> dict[str, Rate]:
    """Each work's rate over interleaved rounds (bench_common.interleaved_seconds, wall time); each
    call handles `items` items (images or pairs)."""
    rates = {}
    for name, rounds in interleaved_seconds(works, repeats, device).items():
        seconds = [wall for wall, _ in rounds]
        rates[name] = Rate(items / statistics.median(seconds), items / max(seconds), items / min(seconds))
    return rates


def bare_forward(model: nn.Module, x: torch.Tensor) -> Work:
    def forward() -> None:
        with torch.inference_mode():
            model(x)
    return forward


def sfam_explain(explainer: SFAM, x: torch.Tensor, y: torch.Tensor) -> Work:
    def explain() -> None:
        with torch.inference_mode():
            explainer.explain(x, y)
    return explain


def gradcam_explain(explainer: SFAM, x: torch.Tensor, y: torch.Tensor) -> Work:
    """Both images of each pair, in two batched GradCAM calls at the explainer's target layer:
    x given y's embedding, y given x's.

    Generous to the baseline: y's embedding takes one no-grad forward, and x's is the output
    that the first GradCAM call computed anyway (`cam.outputs`), so no image is forwarded twice.
    The GradCAM (its hooks) lives only during a call, so the other rows run on a hook-free model.
    """
    model = explainer.model

    def explain_both() -> None:
        with library_cam(model, explainer) as cam:
            with torch.no_grad():
                concepts_y = model(y)
            concept_maps(cam, x, concepts_y)
            concept_maps(cam, y, cam.outputs.detach())
    return explain_both


@dataclass(frozen=True)
class InProcess:
    """One arch's in-process rows: its explainer (target layer and path known) and the works to time."""

    arch: str
    explainer: SFAM
    works: dict[str, Work]


def label(row: str, arch: str) -> str:
    return f"{row} ({arch})"


def in_process(arch: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, rows: tuple[str, ...]) -> InProcess:
    """`rows` of BARE, SFAM_ROW, MATCHED_ROW and GRADCAM for a randomly initialised `arch`, SFAM at its
    default target layer or the one --target-layer names for it."""
    model = build_model(ModelSpec(arch=arch, embedding_dim=EMBEDDING_DIM, input_size=args.size)).to(x.device)
    layer = dict(args.target_layer).get(arch)
    explainer = resolve(SFAM(model, layer, metric=METRIC), x)
    works = {BARE: lambda: bare_forward(model, x), SFAM_ROW: lambda: sfam_explain(explainer, x, y),
             MATCHED_ROW: lambda: sfam_explain(resolve(SFAM(model, layer, metric=METRIC, weighting="matched"), x), x, y),
             GRADCAM: lambda: gradcam_explain(explainer, x, y)}
    return InProcess(arch, explainer, {label(row, arch): works[row]() for row in rows})


# -- the Ray job --------------------------------------------------------------------------------


def run_job(pairs: Pairs, spec: ModelSpec, batch: int, actors: int) -> JobResult:
    """The audit job over the local files, on the Ray this process is connected to or a local one.

    Reads the driver's peak RSS right after the job. Ray is imported here so that the in-process
    rows (`--skip-job`) also run where it is not installed.
    """
    import ray

    from pipeline.distributed.job import run_audit
    from pipeline.distributed.run_record import peak_rss_bytes

    config = JobConfig(manifest=str(pairs.manifest), output=str(pairs.root / "audits"), run_id="bench-speed",
                       model=spec, batch_size=batch, num_actors=actors, max_error_fraction=0.0)
    with nullcontext() if ray.is_initialized() else local_ray(), WorkerMemory().watching() as workers:
        summary = run_audit(config)
    driver_peak = peak_rss_bytes()
    return JobResult(summary, spec.arch, actors, driver_peak, workers)


# -- report -------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def number(value: float) -> str:
    """Three significant digits, without exponents."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def rate_row(name: str, rate: Rate, unit: str) -> list[str]:
    return [name, number(rate.median), f"{number(rate.low)} – {number(rate.high)}", unit]


def ratio_row(name: str, value: float, target: str, met: bool | None) -> list[str]:
    return [name, f"{value:.2f}", target, verdict(met)]


def path_name(explainer: SFAM) -> str:
    return "fast path" if explainer.is_affine else "generic path"


def arch_lines(arch: InProcess, rates: dict[str, Rate]) -> list[list[str]]:
    layer = f"{arch.arch}; `{arch.explainer.target_layer}`"
    sfam = f"{layer}, {path_name(arch.explainer)}"
    where = {BARE: arch.arch, SFAM_ROW: sfam, MATCHED_ROW: sfam, GRADCAM: layer}
    units = {BARE: "images/s", SFAM_ROW: "pairs/s", MATCHED_ROW: "pairs/s", GRADCAM: "pairs/s"}
    return [rate_row(f"{row} ({where[row]})", rates[label(row, arch.arch)], units[row])
            for row in (BARE, SFAM_ROW, MATCHED_ROW, GRADCAM) if label(row, arch.arch) in rates]


def arch_ratios(arch: InProcess, rates: dict[str, Rate]) -> list[list[str]]:
    sfam, matched, bare, gradcam = (rates[label(row, arch.arch)].median for row in (SFAM_ROW, MATCHED_ROW, BARE, GRADCAM))
    fast = bool(arch.explainer.is_affine)
    return [
        ratio_row(f"SFAM matched time ÷ SFAM cis time per pair ({arch.arch})", sfam / matched, "<= 1.5",
                  sfam / matched <= 1.5),
        ratio_row(f"SFAM pairs/s ÷ (bare images/s ÷ 2) ({arch.arch})", sfam / (bare / 2),
                  ">= 0.9" if fast else "none (generic path)", sfam / (bare / 2) >= 0.9 if fast else None),
        ratio_row(f"SFAM ÷ pytorch-grad-cam ({arch.arch}, pairs/s)", sfam / gradcam, ">= 3", sfam / gradcam >= 3),
    ]


def table(args: argparse.Namespace, archs: list[InProcess], rates: dict[str, Rate], job: JobResult | None) -> str:
    compared = [arch for arch in archs if label(GRADCAM, arch.arch) in rates]
    measured = [row for arch in archs for row in arch_lines(arch, rates)]
    ratios = [row for arch in compared for row in arch_ratios(arch, rates)]
    if job is not None:
        summary, (largest_worker, largest_rss) = job.summary, _largest_worker(job.workers)
        measured += [
            [f"{JOB} ({job.arch} at {args.size} px, {summary.pairs} pairs, {job.actors} actor(s), batch {args.batch})",
             number(summary.pairs_per_second), f"one run, {summary.wall_seconds:.0f} s", "pairs/s"],
            [FORWARDS, f"{summary.forward_passes_per_pair:.3f}", "", "forwards/pair"],
            [f"{DRIVER_RSS} (ru_maxrss, read right after the job)", mib(job.driver_peak_bytes), "", "MiB"],
            [f"{WORKER_RSS} ({largest_worker})", mib(largest_rss), "", "MiB"],
            [f"{WORKERS_RSS} (sum over processes, polled every {job.workers.interval_s} s)",
             mib(job.workers.peak_total), "", "MiB"],
        ]
        whole = summary.pairs_per_second / rates[label(SFAM_ROW, job.arch)].median
        forwards = summary.forward_passes_per_pair
        ratios += [
            ratio_row(f"whole job ÷ in-process SFAM ({job.arch}, pairs/s)", whole, ">= 0.6", whole >= 0.6),
            ratio_row("job forward passes per pair", forwards, "<= 1.2", forwards <= 1.2),
        ]
    header = f"measurement ({args.size} px, batch {args.batch}; median of {args.repeats} interleaved rounds)"
    return (markdown([header, "median", "slowest – fastest", "unit"], measured) + "\n\n"
            + markdown(["ratio", "value", "target", ""], ratios))


def _largest_worker(workers: WorkerMemory) -> tuple[str, int]:
    return max(workers.peak_per_process.values(), key=lambda item: item[1], default=("none seen", 0))


def worker_lines(workers: WorkerMemory) -> list[str]:
    peaks = sorted(workers.peak_per_process.values(), key=lambda item: -item[1])
    return [f"- `{title[:60]}`: {mib(rss)} MiB" for title, rss in peaks]


def section(command: str, host: str, args: argparse.Namespace, report: str, job: JobResult | None) -> str:
    device = torch.device(args.device)
    parts = [
        "## Speed",
        "",
        f"Command: `{command}`  ",
        f"Machine: {host}, device {device_name(device)}; {dt.date.today().isoformat()}",
        "",
        report,
        "",
        "Random weights; the classifier replaced by `Linear(K, 512)`; same process and inputs for all rows; "
        "after one warm-up call each, the in-process rows are timed in interleaved rounds"
        + (" (the job runs first, alone)" if job is not None else "")
        + ". SFAM and GradCAM explain the explainer's default target layer, or the one `--target-layer` names "
        "(named in the rows). One "
        "SFAM call explains B pairs (2B images, both maps): the fast path forwards them once, the generic path "
        "forwards them once and backpropagates from the embeddings to the target layer only; SFAM matched "
        "adds the local embeddings of both maps and their matching (the shared-evidence map and the top "
        "correspondences). GradCAM: two "
        "batched calls per B pairs (x given y's embedding, y given x's), y's embedding by a no-grad forward, "
        "x's reused from the first call; the target is the cosine similarity to the partner's embedding; token "
        "layers reach it through a `reshape_transform` (the class token dropped, the patch tokens as a map).",
    ]
    if job is not None:
        parts += ["", "Ray worker processes (children of the raylet), peak RSS each:", *worker_lines(job.workers)]
    return "\n".join(parts) + "\n"


# -- main ---------------------------------------------------------------------------------------


def arch_layer(text: str) -> tuple[str, str]:
    """--target-layer's ARCH=LAYER -> (arch, layer)."""
    arch, equals, layer = text.partition("=")
    if not (arch and equals and layer):
        raise argparse.ArgumentTypeError("takes ARCH=LAYER, e.g. vit_b_16=encoder.layers.encoder_layer_10")
    return arch, layer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vit_b_16"],
                        help="archs of the in-process rows (torchvision or timm/<name>)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per explain call and per job batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, each row once per round (after one warm-up call each)")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--job-arch", help="arch of the Ray job (default: the first of --archs on CUDA, resnet18 on CPU)")
    parser.add_argument("--job-actors", type=int, default=1, help="the job's num_actors")
    parser.add_argument("--job-queries", type=int, default=200)
    parser.add_argument("--job-top-k", type=int, default=10)
    parser.add_argument("--job-gallery", type=int, default=400, help="gallery images the top-k are drawn from")
    parser.add_argument("--target-layer", action="append", default=[], type=arch_layer, metavar="ARCH=LAYER",
                        help="explain this layer of ARCH instead of the explainer's default (repeatable)")
    parser.add_argument("--skip-job", action="store_true", help="only the in-process rows")
    args = parse_benchmark_args(parser, argv, SMOKE, "## Speed")
    if args.job_gallery < args.job_top_k:
        parser.error("--job-gallery must hold at least --job-top-k images")
    if args.job_arch is None:
        args.job_arch = args.archs[0] if args.device.startswith("cuda") else "resnet18"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    host = machine(torch.get_num_threads(), "ray")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as folder:
        pairs = write_pairs(Path(folder), args.job_queries, args.job_top_k, args.job_gallery, np.random.default_rng(0))
        job_spec = ModelSpec(arch=args.job_arch, embedding_dim=EMBEDDING_DIM, input_size=args.size,
                             weights=str(Path(folder) / "model.pt"))
        torch.save(build_model(job_spec.model_copy(update={"weights": None})).state_dict(), job_spec.weights)
        # the job first: its driver's peak RSS is read before the in-process rows allocate anything
        job = None if args.skip_job else run_job(pairs, job_spec, args.batch, args.job_actors)
        x, y = load_inputs(pairs, args.batch, job_spec, device)
        archs = [in_process(arch, args, x, y, (BARE, SFAM_ROW, MATCHED_ROW, GRADCAM)) for arch in args.archs]
        if job is not None and args.job_arch not in args.archs:  # the job's ratio needs its arch's in-process SFAM
            archs.append(in_process(args.job_arch, args, x, y, (SFAM_ROW,)))
        rates = measure_side_by_side({name: work for arch in archs for name, work in arch.works.items()},
                                     args.batch, args.repeats, device)
    report = table(args, archs, rates, job)
    print(report)
    if job is not None:
        print("\nRay worker processes, peak RSS each:", *worker_lines(job.workers), sep="\n")
    if args.write:
        write_section(BENCHMARKS, section(shlex.join(["python", "-m", "jobs.bench_speed", *argv]), host, args, report, job))
        print(f"\nwrote the ## Speed section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
