"""A mean-pooled variant of the demo ViT: which target layer its maps need.

    python -m jobs.study_mean_pooled_vit [--pairs N] [--steps N] [--out-dir DIR]

Trains the demo ViT's recipe (jobs/train_demo_model.py: its steps, losses and seeds) with timm's
`global_pool="avg"` and no class token, saves the weights under --out-dir (not shipped; about 20
minutes on 2 cores; a second run loads them), then scores it with jobs/bench_quality's tests at
`pos_drop` (the tokens entering the first block, the default target layer of mean-pooled ViTs) and
prints the target-layer table: pointing and residual share at the first block's input, at each
block's output and at the last block's output (`blocks`, the default before 2026-11-28). The
figures of BENCHMARKS.md's "A mean-pooled variant of the demo ViT" came from this study.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from jobs import bench_quality, train_demo_model
from pipeline.demo import vit

CHECKPOINT = "demo_vit_mean_pooled.safetensors"
LAYERS = ("pos_drop", "blocks.0", "blocks.1", "blocks.2", "blocks")  # first block's input ... last block's output


def load(checkpoint: Path, pretrained: bool = True) -> nn.Module:
    model = vit.build_vit(mean_pooled=True)
    if pretrained:
        model.load_state_dict(safetensors.torch.load_file(checkpoint))
    return model.eval()


def trained(checkpoint: Path, steps: int | None) -> None:
    """Trains and saves the variant unless `checkpoint` exists; prints its held-out Recall@1."""
    if checkpoint.exists():
        return
    recipe = replace(train_demo_model.RECIPES["vit"], build=partial(vit.build_vit, mean_pooled=True))
    config = recipe.config if steps is None else replace(recipe.config, steps=steps)
    net, _ = train_demo_model.train(recipe, config)
    queries, gallery = train_demo_model.held_out(net, config.eval_size, config.eval_seed)
    print(f"held-out Recall@1 {train_demo_model.recall(queries, gallery):.3f}, "
          f"spread {train_demo_model.spread(queries)}", flush=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    train_demo_model.save(net, checkpoint)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.study_mean_pooled_vit", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs of each quality test")
    parser.add_argument("--steps", type=int, help="training steps (default: the demo ViT's)")
    parser.add_argument("--out-dir", type=Path, default=Path("study-output"), help="where the trained weights go")
    args = parser.parse_args(argv)
    if args.pairs < 1 or (args.steps is not None and args.steps < 3):
        parser.error("--pairs must be at least 1 and --steps at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(bench_quality.THREADS)
    checkpoint = args.out_dir / CHECKPOINT
    trained(checkpoint, args.steps)
    subject = replace(bench_quality.SUBJECTS["vit"], title="mean-pooled demo ViT", load=partial(load, checkpoint),
                      target_layer="pos_drop", sweep=LAYERS)
    scoring = bench_quality.parse_args(["--pairs", str(args.pairs), "--subset", str(min(200, args.pairs)),
                                        "--models", "vit"])
    print(bench_quality.report(bench_quality.evaluate(subject, scoring)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
