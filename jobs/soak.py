"""Scale soak: many small-image pairs through the whole job; rows exact, memory flat, speed steady.

    python -m jobs.soak [--pairs 100000] [--chunk 10000] [--image-side 64] [--smoke] [--write]

A generated audit of `--pairs` pairs (queries x top-10 from a gallery) of small JPEGs, the tiny
model (jobs/tiny_model.py) at the images' size, render_png none, the job's other defaults, on a
local Ray with every core. While it runs, the USS (memory only that process holds, not shared
libraries or the object store's mapped pages) and CPU time of the driver, of the Ray workers
that run the stages and of Ray's own processes are sampled; the result files' times give the
seconds per `--chunk` pairs. Afterwards the committed rows are counted: every pair once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.bench_common import local_ray, machine
from jobs.bench_job import DRIVER, RAY, WORKERS, JobRun, ProcessMonitor, job_config, run_job, write_audit
from jobs.benchmark_report import BENCHMARKS, markdown, parse_benchmark_args, write_section
from jobs.tiny_model import tiny_spec

SECTION = "## Scale soak"
SMOKE = {"pairs": 300, "chunk": 100, "gallery": 50, "interval": 1.0}
TOP_K = 10
GROUPS = (DRIVER, WORKERS, RAY)


@dataclass(frozen=True)
class Chunk:
    """The job when `pairs` result rows were written: the seconds the last chunk took, memory then."""

    pairs: int
    seconds: float
    uss_mib: dict[str, float]  # per process group


def written_at(run: JobRun, rows: int) -> float:
    """When the result files held `rows` rows (the first file that reached it)."""
    total = 0
    for mtime, count in run.parts:
        total += count
        if total >= rows:
            return mtime
    return run.parts[-1][0]


def uss_at(run: JobRun, moment: float) -> dict[str, float]:
    """USS in MiB per process group in the last sample taken at or before `moment`."""
    sample = max((s for s in run.monitor.samples if s.at <= moment), key=lambda s: s.at, default=run.monitor.samples[0])
    return {group: sample.uss.get(group, 0) / 2**20 for group in GROUPS}


def chunks(run: JobRun, chunk: int) -> list[Chunk]:
    """Per `chunk` rows written: how long they took and the processes' USS when they were done."""
    marks = [run.started, *(written_at(run, rows) for rows in range(chunk, run.summary.pairs + 1, chunk))]
    return [Chunk(chunk * i, marks[i] - marks[i - 1], uss_at(run, marks[i])) for i in range(1, len(marks))]


def distinct_pairs(output: Path, attempt: str) -> int:
    """Distinct pair_ids in the attempt's result files."""
    files = sorted(output.rglob(f"part-{attempt}-*.parquet"))
    return len(pc.unique(pq.read_table(files, columns=["pair_id"]).column("pair_id")))


def table(rows: list[Chunk], chunk: int) -> str:
    return markdown(["pairs written", f"seconds for these {chunk:,}", "driver USS (MiB)", f"{WORKERS} USS (MiB)",
                     f"{RAY} USS (MiB)"],
                    [[f"{c.pairs:,}", f"{c.seconds:.1f}", f"{c.uss_mib[DRIVER]:,.0f}", f"{c.uss_mib[WORKERS]:,.0f}",
                      f"{c.uss_mib[RAY]:,.0f}"] for c in rows])


def summary_lines(run: JobRun, manifest_rows: int, distinct: int, rows: list[Chunk]) -> list[str]:
    steady = [c.seconds for c in rows[1:]] or [rows[0].seconds]
    first, last = rows[min(1, len(rows) - 1)], rows[-1]
    growth = {group: last.uss_mib[group] - first.uss_mib[group] for group in GROUPS}
    return [
        f"- rows: {run.summary.pairs:,} result rows, {distinct:,} distinct pair ids, {manifest_rows:,} manifest rows "
        f"({'exact' if run.summary.pairs == distinct == manifest_rows else 'NOT EXACT'}); "
        f"{run.summary.error} error rows",
        f"- wall: {run.seconds:,.0f} s, {run.pairs_per_second:,.0f} pairs/s; first result file after "
        f"{run.first_result:.1f} s",
        f"- seconds per chunk after the first: min {min(steady):.1f}, median {float(np.median(steady)):.1f}, "
        f"max {max(steady):.1f}",
        f"- USS from {first.pairs:,} to {last.pairs:,} pairs: "
        + ", ".join(f"{group} {growth[group]:+,.0f} MiB" for group in GROUPS),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help=f"pairs in the manifest (queries x top-{TOP_K})")
    parser.add_argument("--chunk", type=int, default=10_000, help="pairs per row of the table")
    parser.add_argument("--gallery", type=int, default=2_000, help="gallery images the top-k are drawn from")
    parser.add_argument("--image-side", type=int, default=64, help="the JPEGs' width and height, and the model's input size")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    args = parse_benchmark_args(parser, argv, SMOKE, SECTION)
    if args.pairs % TOP_K or args.gallery < TOP_K:
        parser.error(f"--pairs must be a multiple of {TOP_K} and --gallery at least {TOP_K}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    side = args.image_side
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        audit = write_audit(Path(folder) / "audit", args.pairs // TOP_K, TOP_K, args.gallery, (side, side),
                            np.random.default_rng(0))
        config = job_config(audit, "soak", tiny_spec(side), render_png="none")
        with local_ray():
            run = run_job(config, ProcessMonitor(interval_s=args.interval, uss=True))
        distinct = distinct_pairs(Path(config.output), run.summary.attempt)
    rows = chunks(run, args.chunk)
    report = "\n".join([table(rows, args.chunk), "", *summary_lines(run, audit.pairs, distinct, rows)])
    print(report)
    if args.write:
        command = shlex.join(["python", "-m", "jobs.soak", *argv])
        write_section(BENCHMARKS, "\n".join([
            SECTION, "", f"Command: `{command}`  ", f"Machine: {machine(1, 'ray')}  ",
            f"Audit: {audit.pairs:,} pairs of {side}x{side} JPEGs, tiny model at {side} px, render_png none, "
            f"batch {run.summary.batch_size}, {run.summary.num_actors} actors; USS sampled every {args.interval:g} s",
            "", report,
        ]) + "\n")
        print(f"\nwrote the {SECTION} section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
