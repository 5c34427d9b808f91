"""CPU stages of the job, side by side: decoding JPEG pairs (full vs draft) and rendering PNG overlays.

    python -m jobs.bench_stages [--pairs 24] [--repeats 5] [--stages decode render] [--smoke] [--write]

Everything runs in this process on one core, on generated 640x480 JPEGs (smooth colours, solid
shapes, sensor noise). Times are CPU time (`time.process_time`), median of interleaved rounds.
Where there is a GPU, decoding on it with nvJPEG is timed too (wall and CPU time per pair), next
to decode_pictures on one core.
"""

from __future__ import annotations

import argparse
import io
import shlex
import statistics
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from jobs.bench_common import Work, interleaved_seconds
from jobs.benchmark_report import BENCHMARKS, cpu_name, markdown, parse_benchmark_args, write_section
from pipeline.config import MAX_IMAGE_PIXELS
from pipeline.io.images import decode_image, decode_jpegs, decode_pictures, display_image, resize_for_model, torchvision_jpeg
from pipeline.render import render_pair_png
from pipeline.render.overlay import encode_png
from pipeline.render.result_row import DISPLAY_SIDE

SECTION = "## CPU stages"
SMOKE = {"pairs": 4, "repeats": 1}
FULL_DECODE = "decode + resize a pair: full decode, then resize_for_model and display_image (before)"
DRAFT_DECODE = "decode + resize a pair: decode_pictures, JPEG draft mode (now)"
HEADER_CHECK = "check a pair's headers for the GPU: torchvision_jpeg (what the fetch does when the actors decode)"
NVJPEG_DECODE = ("decode + resize a pair on the GPU: decode_jpegs, nvJPEG (all pairs in one call), antialiased resize "
                 "there, both pictures back to the host")


@dataclass(frozen=True)
class Row:
    name: str
    ms: float  # median CPU ms per item
    kb: float | None = None  # bytes written per item, in KiB


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG (quality 90): smooth colours, a dozen solid shapes, sensor noise."""
    img = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = (int(v) for v in rng.integers(0, [width, height, height // 4]))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img) + rng.normal(0, 4, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def saliency_map(rng: np.random.Generator, side: int) -> np.ndarray:
    """A feature-resolution map like SFAM's: two blobs of evidence and some noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    blobs = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) for cy, cx in rng.random((2, 2)))
    return blobs + 0.1 * rng.random((side, side))


def median_ms(works: dict[str, Work], items: int, repeats: int,
              device: torch.device = torch.device("cpu")) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms per item of each work, over `repeats` interleaved rounds after a warm-up call."""
    return {name: tuple(1000 * statistics.median(clock) / items for clock in zip(*rounds))
            for name, rounds in interleaved_seconds(works, repeats, device).items()}


def cpu_ms(works: dict[str, Work], items: int, repeats: int) -> dict[str, float]:
    """Median CPU ms per item of each work (median_ms's CPU time)."""
    return {name: cpu for name, (_, cpu) in median_ms(works, items, repeats).items()}


def decode_rows(pairs: list[tuple[bytes, bytes]], model_size: int, repeats: int) -> list[Row]:
    def full() -> None:
        for data in (image for pair in pairs for image in pair):
            rgb = decode_image(data, "bench.jpg", MAX_IMAGE_PIXELS)
            resize_for_model(rgb, model_size), display_image(rgb, DISPLAY_SIDE)

    def draft() -> None:
        for data in (image for pair in pairs for image in pair):
            decode_pictures(data, "bench.jpg", MAX_IMAGE_PIXELS, model_size, DISPLAY_SIDE)

    def header() -> None:
        for data in (image for pair in pairs for image in pair):
            torchvision_jpeg(data, "bench.jpg", MAX_IMAGE_PIXELS)

    ms = cpu_ms({FULL_DECODE: full, DRAFT_DECODE: draft, HEADER_CHECK: header}, len(pairs), repeats)
    return [Row(name, value) for name, value in ms.items()]


@dataclass(frozen=True)
class GpuRow:
    name: str
    wall_ms: float  # median wall ms per pair
    cpu_ms: float  # median CPU ms per pair


def gpu_decode_rows(pairs: list[tuple[bytes, bytes]], model_size: int, repeats: int, device: torch.device) -> list[GpuRow]:
    """nvJPEG next to decode_pictures on one core, in wall and CPU time per pair (interleaved rounds)."""
    jpegs = [torchvision_jpeg(data, "bench.jpg", MAX_IMAGE_PIXELS) for pair in pairs for data in pair]
    uris = ["bench.jpg"] * len(jpegs)
    works = {
        NVJPEG_DECODE: lambda: decode_jpegs(jpegs, uris, MAX_IMAGE_PIXELS, model_size, DISPLAY_SIDE, device),
        DRAFT_DECODE: lambda: [decode_pictures(data, "bench.jpg", MAX_IMAGE_PIXELS, model_size, DISPLAY_SIDE)
                               for pair in pairs for data in pair],
    }
    return [GpuRow(name, wall, cpu) for name, (wall, cpu) in median_ms(works, len(pairs), repeats, device).items()]


def pillow_png(canvas: np.ndarray, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG", **options)
    return out.getvalue()


@dataclass(frozen=True)
class Overlay:
    display_side: int  # longest side of the display pictures
    map_side: int  # the saliency maps are map_side x map_side
    panel_height: int = 256  # render_pair_png's default

    def __str__(self) -> str:
        return f"display side {self.display_side}, {self.map_side}x{self.map_side} maps, panel height {self.panel_height}"


OVERLAYS = [Overlay(DISPLAY_SIDE, 7), Overlay(DISPLAY_SIDE, 14), Overlay(640, 7), Overlay(640, 14),
            Overlay(DISPLAY_SIDE, 7, panel_height=192)]


def render_rows(pairs: list[tuple[bytes, bytes]], overlay: Overlay, repeats: int, rng: np.random.Generator) -> list[Row]:
    """render_pair_png as the job calls it, and its canvas encoded by each PNG encoder."""
    displays = [[decode_pictures(data, "bench.jpg", MAX_IMAGE_PIXELS, 224, overlay.display_side).display for data in pair]
                for pair in pairs]
    maps = [(saliency_map(rng, overlay.map_side), saliency_map(rng, overlay.map_side)) for _ in pairs]

    def render(query: np.ndarray, reference: np.ndarray, map_q: np.ndarray, map_r: np.ndarray) -> bytes:
        return render_pair_png(query, reference, map_q, map_r, similarity=0.734, metric="cosine",
                               title="q17/g203", top_channels=range(10), query_box=(40, 30, 160, 120),
                               panel_height=overlay.panel_height)

    pngs = [render(*display, *pair_maps) for display, pair_maps in zip(displays, maps)]
    canvases = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]
    encoders: dict[str, Callable[[np.ndarray], bytes]] = {
        "encode: Pillow, default level 6 (before)": lambda c: pillow_png(c, optimize=False),
        "encode: Pillow, compress_level=1": lambda c: pillow_png(c, compress_level=1),
        "encode: Pillow, compress_level=1, Z_RLE": lambda c: pillow_png(c, compress_level=1, compress_type=zlib.Z_RLE),
        "encode: encode_png, Up filter, level 1, Z_RLE (now)": encode_png,
    }
    works = {"render_pair_png, whole overlay (now)": lambda: [render(*d, *m) for d, m in zip(displays, maps)]}
    works.update({name: (lambda e=encode: [e(c) for c in canvases]) for name, encode in encoders.items()})
    ms = cpu_ms(works, len(pairs), repeats)
    sizes = [sum(map(len, pngs))] + [sum(len(encode(c)) for c in canvases) for encode in encoders.values()]
    return [Row(name, value, size / len(pairs) / 1024) for (name, value), size in zip(ms.items(), sizes)]


def table(decode: list[Row], renders: dict[Overlay, list[Row]], gpu_decode: list[GpuRow]) -> str:
    parts = [markdown(["measurement (per pair or per overlay)", "CPU ms", "KiB"],
                      [[row.name, f"{row.ms:.2f}", ""] for row in decode]
                      + [[f"{row.name}; {overlay}", f"{row.ms:.2f}", f"{row.kb:,.0f}"]
                         for overlay, rows in renders.items() for row in rows])]
    if decode:
        parts.append(markdown(["throughput (1 core)", "value", "unit"],
                              [[f"single process, {row.name.split(': ', 1)[1]}", f"{1000 / row.ms:,.0f}", "pairs/s"]
                               for row in decode]))
    if gpu_decode:
        parts.append(markdown([f"on {torch.cuda.get_device_name()} (per pair)", "wall ms", "CPU ms", "pairs/s"],
                              [[row.name, f"{row.wall_ms:.2f}", f"{row.cpu_ms:.2f}", f"{1000 / row.wall_ms:,.0f}"]
                               for row in gpu_decode]))
    return "\n\n".join(parts)


def section(command: str, args: argparse.Namespace, report: str) -> str:
    return "\n".join([
        SECTION, "",
        f"Command: `{command}`  ",
        f"Machine: {cpu_name()}, one process (CPU time); {args.pairs} pairs of 640x480 JPEGs, "
        f"model input {args.size} px; median of {args.repeats} interleaved rounds",
        "", report, "",
        "Encoder rows encode the same canvases that render_pair_png drew; Pillow at its default level "
        "is what render_pair_png used before it wrote its PNGs with encode_png."
        + (" GPU rows: wall time with the GPU synchronised; decode_pictures there runs on one of the node's "
           "cores, so the node's cores multiply its pairs/s." if torch.cuda.is_available() else ""),
    ]) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_stages", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24, help="distinct JPEG pairs, each decoded and rendered per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up call each)")
    parser.add_argument("--size", type=int, default=224, help="model input size in pixels")
    parser.add_argument("--stages", nargs="+", choices=["decode", "render"], default=["decode", "render"],
                        help="which rows: decoding (and nvJPEG where there is a GPU), rendering")
    args = parse_benchmark_args(parser, argv, SMOKE, SECTION)
    if args.write and set(args.stages) != {"decode", "render"}:
        parser.error("--write replaces the whole section: it needs every stage (leave --stages out)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)  # one core, as in the job's tasks (Ray gives each OMP_NUM_THREADS=1)
    rng = np.random.default_rng(0)
    pairs = [(photo_jpeg(rng, 640, 480), photo_jpeg(rng, 640, 480)) for _ in range(args.pairs)]
    decoding, rendering = "decode" in args.stages, "render" in args.stages
    decode = decode_rows(pairs, args.size, args.repeats) if decoding else []
    renders = {overlay: render_rows(pairs, overlay, args.repeats, rng) for overlay in OVERLAYS} if rendering else {}
    on_gpu = decoding and torch.cuda.is_available()
    gpu_decode = gpu_decode_rows(pairs, args.size, args.repeats, torch.device("cuda")) if on_gpu else []
    report = table(decode, renders, gpu_decode)
    print(report)
    if args.write:
        write_section(BENCHMARKS, section(shlex.join(["python", "-m", "jobs.bench_stages", *argv]), args, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
