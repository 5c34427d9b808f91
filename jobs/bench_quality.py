"""Explanation quality on the demo model: SFAM against Grad-CAM and class-agnostic baselines.

    python -m jobs.bench_quality [--pairs N] [--subset N] [--seed S] [--smoke] [--write]

Four tests, each scoring the query-side map of every method on freshly drawn pairs of
cluttered canvases (held-out "test" digits, numpy Generator(--seed), a seed used nowhere
else in the project):

1. Single-object localisation (`--pairs` pairs of single-digit canvases of one class):
   pointing game, energy in the digit's box, and top-1 localisation as in the CAM literature
   (map upsampled to the image, thresholded at 20 % / 50 % of its maximum, box around the
   largest connected component, hit when its IoU with the digit's box is >= 0.5).
2. Shared-object test (`--pairs` pairs of two-digit canvases, query {a, b}, reference {a, c},
   a, b, c distinct): whether the map's maximum lies in the box of the shared digit a, and
   the share of the map's positive mass in a's box relative to both digits' boxes. A
   class-agnostic map scores about 0.5 (it picks either digit); a random one's maximum often
   misses both digits.
3. Faithfulness (the first `--subset` pairs of test 1): deletion and insertion curves of
   the pair's cosine similarity, removing / revealing the query's pixels in the map's order
   (most relevant first, ties in random order) in 5 % steps, a Gaussian blur (sigma 4 px) of
   the query as the removed content. Each curve is divided by the pair's original similarity
   (s / s_original: the share of the similarity kept), so that both curves end at the same
   points for every method: 1 with the whole query, s_blurred / s_original with none of it.
   (Normalising to (s - s_blurred) / (s_original - s_blurred) is unstable here: the demo
   model keeps much of the similarity of a blurred canvas, and a few pairs have
   s_blurred >= s_original.) The area is over the removed / revealed fraction in [0, 1].
   The random map's row is the random-order reference.
4. Sanity check (Adebayo et al. 2018; the same `--subset` pairs): Spearman correlation
   between each method's upsampled map under the trained model and under the same
   architecture re-initialised with torch.manual_seed(--seed); mean over pairs.

Grad-CAM runs twice: pytorch-grad-cam's `GradCAM` with the cosine-to-a-concept target of
its embedding tutorial, and the project's baseline (`gradcam_similarity`); the two must agree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from scipy import ndimage, stats
from torch import nn

from jobs.benchmark_report import BENCHMARKS, cpu_name, parse_benchmark_args, write_section
from pipeline import SFAM
from pipeline.demo.canvas import make_canvas
from pipeline.demo.model import EMBEDDING_LAYER, INPUT_SIZE, MEAN, STD, TARGET_LAYER, demo_model
from pipeline.explain.baselines import gradcam_similarity, mean_activation, random_map
from pipeline.io.images import to_model_tensor
from pipeline.localisation import Box, energy_in_box, pointing_hit, upsample

SEED = 31415926  # data, re-initialised weights and random maps; used nowhere else in the project
THREADS = 2
SPLIT = "test"
SIZE = INPUT_SIZE  # canvas side = model input side: a map covers the whole image
BATCH = 100  # pairs per explanation call
FRACTIONS = np.linspace(0.0, 1.0, 21)  # deletion / insertion steps of 5 %
CURVE_PAIRS = 12  # pairs per forward of deletion / insertion images (21 images a pair)
BLUR_SIGMA = 4.0  # px, the deletion / insertion baseline image
LOC_THRESHOLDS = (0.2, 0.5)  # top-1 localisation: fraction of the map's maximum
SMOKE = {"pairs": 16, "subset": 8}

SFAM_CIS = "SFAM (cis)"
SFAM_PARTNER = "SFAM (partner)"
GRADCAM_LIBRARY = "Grad-CAM (pytorch-grad-cam)"
GRADCAM_PROJECT = "Grad-CAM (project baseline)"
MEAN_ACTIVATION = "mean activation"
RANDOM = "random"
METHODS = (SFAM_CIS, SFAM_PARTNER, GRADCAM_LIBRARY, GRADCAM_PROJECT, MEAN_ACTIVATION, RANDOM)

POINTING = "pointing"
ENERGY = "energy in box"
LOC = {threshold: f"top-1 loc {threshold:.0%}" for threshold in LOC_THRESHOLDS}
SHARED_POINTING = "shared pointing"
SHARED_ENERGY = "shared energy"
DELETION = "deletion AUC"
INSERTION = "insertion AUC"
RANDOMISATION = "randomisation ρ"
METRICS = (POINTING, ENERGY, *LOC.values(), SHARED_POINTING, SHARED_ENERGY, DELETION, INSERTION, RANDOMISATION)
UNIT_INTERVAL = (POINTING, ENERGY, *LOC.values(), SHARED_POINTING, SHARED_ENERGY)  # shares: always in [0, 1]

Scores = dict[str, dict[str, float]]  # method -> metric -> value


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """N pairs of canvases; `boxes` locates the scored digit of each query, `other_boxes` the
    query's second digit (shared-object pairs only)."""

    query: np.ndarray  # (N, S, S, 3) uint8
    reference: np.ndarray  # (N, S, S, 3) uint8
    boxes: list[Box]
    other_boxes: list[Box]

    def __getitem__(self, index: slice) -> Pairs:
        return Pairs(self.query[index], self.reference[index], self.boxes[index], self.other_boxes[index])


def single_object_pairs(rng: np.random.Generator, n: int) -> Pairs:
    """Pairs of single-digit canvases of the same class, uniform over the classes."""
    query, reference = [], []
    for digit in rng.integers(0, 10, n):
        query.append(make_canvas(rng, [digit], SPLIT, SIZE))
        reference.append(make_canvas(rng, [digit], SPLIT, SIZE))
    return Pairs(np.stack([c.image for c in query]), np.stack([c.image for c in reference]),
                 [c.boxes[0] for c in query], [])


def shared_object_pairs(rng: np.random.Generator, n: int) -> Pairs:
    """Query digits {a, b}, reference digits {a, c}, a, b, c distinct, in random order on each canvas."""
    query, reference, shared, other = [], [], [], []
    for _ in range(n):
        a, b, c = (int(d) for d in rng.choice(10, 3, replace=False))
        q = make_canvas(rng, rng.permutation([a, b]), SPLIT, SIZE)
        query.append(q.image)
        reference.append(make_canvas(rng, rng.permutation([a, c]), SPLIT, SIZE).image)
        shared.append(q.boxes[q.labels.index(a)])
        other.append(q.boxes[q.labels.index(b)])
    return Pairs(np.stack(query), np.stack(reference), shared, other)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return to_model_tensor(images, MEAN, STD)


# -- maps -----------------------------------------------------------------------------------------


class CosineToConcept:
    """pytorch-grad-cam target of its embedding tutorial: cosine of the output to a fixed embedding."""

    def __init__(self, concept: torch.Tensor) -> None:
        self.concept = concept

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.concept, dim=0)


def library_gradcam(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's maps of x for the cosine to y's embedding: (B, S, S), min-max scaled by the library."""
    with torch.no_grad():
        concepts = model(y)
    with GradCAM(model=model, target_layers=[model.get_submodule(TARGET_LAYER)]) as cam:
        maps = cam(input_tensor=x, targets=[CosineToConcept(c) for c in concepts])
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps)


def query_maps(model: nn.Module, pairs: Pairs, generator: torch.Generator) -> dict[str, np.ndarray]:
    """Every method's query map of every pair, method -> (N, h, w) float32 (h = w = 16 at feature
    resolution; 64 for pytorch-grad-cam, which upsamples itself)."""
    sfam = {weighting: SFAM(model, TARGET_LAYER, "cosine", embedding_layer=EMBEDDING_LAYER, weighting=weighting)
            for weighting in ("cis", "partner")}
    batches: dict[str, list[torch.Tensor]] = {method: [] for method in METHODS}
    for start in range(0, len(pairs.query), BATCH):
        x, y = to_tensor(pairs.query[start : start + BATCH]), to_tensor(pairs.reference[start : start + BATCH])
        with torch.inference_mode():
            features, _ = sfam["cis"].features(x)
        batches[SFAM_CIS].append(sfam["cis"].explain(x, y).map_query)
        batches[SFAM_PARTNER].append(sfam["partner"].explain(x, y).map_query)
        batches[GRADCAM_LIBRARY].append(library_gradcam(model, x, y))
        batches[GRADCAM_PROJECT].append(gradcam_similarity(model, TARGET_LAYER, x, y, "cosine", EMBEDDING_LAYER))
        batches[MEAN_ACTIVATION].append(mean_activation(features))
        batches[RANDOM].append(random_map(features, generator))
    return {method: torch.cat(maps).float().numpy() for method, maps in batches.items()}


def upsampled(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) -> (N, S, S) bilinear, at the canvas's resolution."""
    return np.stack([upsample(m, SIZE, SIZE) for m in maps])


def min_max(maps: np.ndarray) -> np.ndarray:
    """Each map of (N, S, S) scaled to [0, 1]; a constant map becomes 0. No epsilon: pytorch-grad-cam's
    1e-7 would dominate maps whose values are that small (a re-initialised model's Grad-CAM)."""
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return (maps - low) / np.where(span > 0, span, 1.0)


# -- test 1: single-object localisation ------------------------------------------------------------


def largest_component_box(saliency: np.ndarray, fraction: float) -> Box | None:
    """Box (x0, y0, x1, y1) px around the largest 4-connected region >= fraction * max; None for a map
    without positive values."""
    peak = float(saliency.max())
    if peak <= 0:
        return None
    components, count = ndimage.label(saliency >= fraction * peak)
    largest = 1 + int(np.argmax(np.bincount(components.ravel(), minlength=count + 1)[1:]))
    rows, cols = np.nonzero(components == largest)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def localisation(maps: dict[str, np.ndarray], boxes: list[Box]) -> Scores:
    """Pointing game, energy in the box (a map without positive mass scores 0), top-1 localisation."""
    scores: Scores = {}
    for method, method_maps in maps.items():
        fine = upsampled(method_maps)
        energy = [energy_in_box(m, box, (SIZE, SIZE)) for m, box in zip(method_maps, boxes)]
        scores[method] = {
            POINTING: float(np.mean([pointing_hit(m, box, (SIZE, SIZE)) for m, box in zip(method_maps, boxes)])),
            ENERGY: float(np.mean(np.nan_to_num(energy, nan=0.0))),
        }
        for threshold, column in LOC.items():
            found = [largest_component_box(m, threshold) for m in fine]
            scores[method][column] = float(np.mean([b is not None and iou(b, box) >= 0.5
                                                    for b, box in zip(found, boxes)]))
    return scores


# -- test 2: shared object -------------------------------------------------------------------------


def shared_object(maps: dict[str, np.ndarray], shared: list[Box], other: list[Box]) -> Scores:
    """Pointing at the shared digit's box, and the shared box's share of the positive mass in both
    digits' boxes (0.5, no preference, for a map without positive mass on either digit)."""
    scores: Scores = {}
    for method, method_maps in maps.items():
        shares = []
        for m, box_shared, box_other in zip(method_maps, shared, other):
            on_shared, on_other = (np.nan_to_num(energy_in_box(m, box, (SIZE, SIZE))) for box in (box_shared, box_other))
            shares.append(on_shared / (on_shared + on_other) if on_shared + on_other > 0 else 0.5)
        scores[method] = {
            SHARED_POINTING: float(np.mean([pointing_hit(m, box, (SIZE, SIZE))
                                            for m, box in zip(method_maps, shared)])),
            SHARED_ENERGY: float(np.mean(shares)),
        }
    return scores


# -- test 3: faithfulness --------------------------------------------------------------------------


def relevance_ranks(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, h, w) maps -> (N, S*S) each pixel's position in the order most relevant first, ties random."""
    fine = upsampled(maps).reshape(len(maps), -1)
    ranks = np.empty(fine.shape, np.int64)
    for i, values in enumerate(fine):
        order = np.lexsort((rng.random(values.size), -values))
        ranks[i, order] = np.arange(values.size)
    return ranks


def similarity_curves(model: nn.Module, x: torch.Tensor, blurred: torch.Tensor, concepts: torch.Tensor,
                      ranks: torch.Tensor, insertion: bool) -> torch.Tensor:
    """(N, steps) cosine similarities as the query's pixels are removed (or revealed) in rank order."""
    counts = torch.from_numpy(np.rint(FRACTIONS * SIZE * SIZE).astype(np.int64))
    curves = []
    with torch.inference_mode():
        for start in range(0, len(x), CURVE_PAIRS):
            part = slice(start, start + CURVE_PAIRS)
            changed = ranks[part, None, :] < counts[None, :, None]  # (n, steps, S*S)
            changed = changed.view(*changed.shape[:2], 1, SIZE, SIZE)
            first, then = (blurred[part], x[part]) if insertion else (x[part], blurred[part])
            images = torch.where(changed, then[:, None], first[:, None])  # (n, steps, 3, S, S)
            embeddings = model(images.flatten(0, 1)).view(*images.shape[:2], -1)
            curves.append((embeddings * concepts[part, None]).sum(dim=2))
    return torch.cat(curves)


def faithfulness(model: nn.Module, maps: dict[str, np.ndarray], pairs: Pairs, rng: np.random.Generator) -> Scores:
    """Deletion and insertion AUC of the similarity curves, each divided by its pair's original similarity."""
    blurred_images = np.rint(ndimage.gaussian_filter(pairs.query.astype(np.float32), (0, BLUR_SIGMA, BLUR_SIGMA, 0)))
    x, blurred = to_tensor(pairs.query), to_tensor(np.clip(blurred_images, 0, 255).astype(np.uint8))
    with torch.inference_mode():
        concepts = model(to_tensor(pairs.reference))
        original = (model(x) * concepts).sum(dim=1, keepdim=True)
    scores: Scores = {}
    for method, method_maps in maps.items():
        ranks = torch.from_numpy(relevance_ranks(method_maps, rng))
        areas = {}
        for column, insertion in ((DELETION, False), (INSERTION, True)):
            curves = similarity_curves(model, x, blurred, concepts, ranks, insertion)
            areas[column] = float(np.trapezoid((curves / original).numpy(), FRACTIONS, axis=1).mean())
        scores[method] = areas
    return scores


# -- test 4: sanity check (model randomisation) ----------------------------------------------------


def randomisation(trained: dict[str, np.ndarray], reinitialised: dict[str, np.ndarray]) -> Scores:
    """Mean Spearman correlation of each pair's upsampled maps under both models (a constant map, which
    ranks nothing, counts 0)."""
    scores: Scores = {}
    for method in trained:
        rhos = []
        for a, b in zip(upsampled(trained[method]), upsampled(reinitialised[method])):
            constant = a.min() == a.max() or b.min() == b.max()
            rhos.append(0.0 if constant else stats.spearmanr(a.ravel(), b.ravel()).statistic)
        scores[method] = {RANDOMISATION: float(np.mean(rhos))}
    return scores


# -- Grad-CAM agreement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """pytorch-grad-cam against the project's Grad-CAM: min-max scaled maps at the canvas's resolution."""

    mean_abs_difference: float
    max_abs_difference: float
    correlation: float  # Pearson, over all pixels of all pairs


def gradcam_agreement(maps: dict[str, np.ndarray]) -> Agreement:
    library, project = (min_max(upsampled(maps[method])) for method in (GRADCAM_LIBRARY, GRADCAM_PROJECT))
    difference = np.abs(library - project)
    return Agreement(float(difference.mean()), float(difference.max()),
                     float(np.corrcoef(library.ravel(), project.ravel())[0, 1]))


# -- report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    goal: str
    margin: float  # how far the value is on the good side of the goal (negative: missed by that much)
    met: bool


def targets(scores: Scores) -> list[Target]:
    """The issue's targets, SFAM (cis) against pytorch-grad-cam's Grad-CAM."""
    sfam, gradcam = scores[SFAM_CIS], scores[GRADCAM_LIBRARY]
    lead = sfam[SHARED_POINTING] - gradcam[SHARED_POINTING]
    deletion = sfam[DELETION] - gradcam[DELETION]
    rho = sfam[RANDOMISATION]
    return [
        Target(f"{SFAM_CIS} {SHARED_POINTING}", sfam[SHARED_POINTING], ">= 0.85", sfam[SHARED_POINTING] - 0.85,
               sfam[SHARED_POINTING] >= 0.85),
        Target(f"{SFAM_CIS} − Grad-CAM, {SHARED_POINTING}", lead, ">= 0.10", lead - 0.10, lead >= 0.10),
        Target(f"{SFAM_CIS} − Grad-CAM, {DELETION}", deletion, "< 0", -deletion, deletion < 0),
        Target(f"{SFAM_CIS} {RANDOMISATION}", rho, "<= 0.3", 0.3 - rho, rho <= 0.3),
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def report(scores: Scores, agreement: Agreement) -> str:
    results = markdown(["method", *METRICS],
                       [[method, *(f"{scores[method][metric]:.3f}" for metric in METRICS)] for method in METHODS])
    agree = markdown(
        ["Grad-CAM agreement (min-max scaled, upsampled maps)", "mean abs difference", "max abs difference",
         "correlation"],
        [[f"{GRADCAM_LIBRARY} vs {GRADCAM_PROJECT}", f"{agreement.mean_abs_difference:.2e}",
          f"{agreement.max_abs_difference:.2e}", f"{agreement.correlation:.6f}"]])
    goals = markdown(["target", "value", "goal", "margin", ""],
                     [[t.name, f"{t.value:.3f}", t.goal, f"{t.margin:+.3f}", "met" if t.met else "MISSED"]
                      for t in targets(scores)])
    return "\n\n".join([results, agree, goals])


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores ({THREADS} torch threads), torch {torch.__version__}"


def section(command: str, args: argparse.Namespace, body: str, seconds: float) -> str:
    return "\n".join([
        "## Quality",
        "",
        f"Command: `{command}`  ",
        f"Date: {dt.date.today().isoformat()}; machine: {machine()}; {seconds:.0f} s  ",
        f"Seeds: {args.seed} for numpy `Generator` (data, tie-breaks), `torch.manual_seed` (re-initialised "
        f"weights) and `torch.Generator` (random maps); held-out `{SPLIT}` digits, {SIZE} px canvases  ",
        f"Pairs: {args.pairs} single-object (test 1), {args.pairs} shared-object (test 2), the first "
        f"{args.subset} single-object pairs for faithfulness and the sanity check",
        "",
        body,
        "",
        "Columns: single-object pointing game, energy in the digit's box, top-1 localisation (largest "
        "connected component of the upsampled map above 20 % / 50 % of its maximum, IoU >= 0.5); "
        "shared-object pointing (maximum in the shared digit's box) and energy (shared box's share of the "
        "positive mass in both digits' boxes); deletion / insertion AUC of the pair's cosine similarity "
        "divided by its value on the original query, 5 % steps, Gaussian blur sigma "
        f"{BLUR_SIGMA:g} px as the baseline (lower deletion, higher insertion is better; the random row is "
        "the random order); randomisation ρ: mean Spearman correlation of the maps of the trained and a "
        "re-initialised model (lower is better). Grad-CAM targets use the pytorch-grad-cam row.",
        "",
    ])


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="pairs of test 1 and of test 2")
    parser.add_argument("--subset", type=int, default=200,
                        help="the first N pairs of test 1 run faithfulness and the sanity check")
    parser.add_argument("--seed", type=int, default=SEED, help="data, re-initialised weights, random maps")
    args = parse_benchmark_args(parser, argv, SMOKE, "## Quality")
    if not 1 <= args.subset <= args.pairs:
        parser.error("--subset must be between 1 and --pairs")
    return args


def merge(*parts: Scores) -> Scores:
    """The tests' scores, method -> every metric."""
    return {method: {metric: value for part in parts for metric, value in part[method].items()} for method in METHODS}


def run(args: argparse.Namespace) -> tuple[Scores, Agreement]:
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    single, shared = single_object_pairs(rng, args.pairs), shared_object_pairs(rng, args.pairs)
    model = demo_model()
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        reinitialised = demo_model(pretrained=False)
    single_maps = query_maps(model, single, generator)
    subset, subset_maps = single[: args.subset], {method: maps[: args.subset] for method, maps in single_maps.items()}
    scores = merge(
        localisation(single_maps, single.boxes),
        shared_object(query_maps(model, shared, generator), shared.boxes, shared.other_boxes),
        faithfulness(model, subset_maps, subset, rng),
        randomisation(subset_maps, query_maps(reinitialised, subset, generator)),
    )
    return scores, gradcam_agreement(single_maps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    body = report(*run(args))
    seconds = time.perf_counter() - started
    print(body)
    print(f"\n{seconds:.0f} s")
    if args.write:
        command = shlex.join(["python", "-m", "jobs.bench_quality", *argv])
        write_section(BENCHMARKS, section(command, args, body, seconds))
        print(f"wrote the ## Quality section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
