"""Train one of the built-in demo's metric-learning models and write its checkpoint and card.

    python -m jobs.train_demo_model [--model cnn|vit] [--steps N] [--out-dir DIR] [--eval-size N]
                                    [--classes-per-batch N] [--samples-per-class N]

Both models learn from the same recipe: supervised contrastive loss (SupCon) on the
L2-normalised embeddings of fresh cluttered canvases each step (train digit split; every
batch holds samples-per-class canvases of each of classes-per-batch random classes). A
transformer trained from scratch on so little data stays near a constant embedding for the
few hundred steps a 2-core CPU allows, so the ViT adds a classification proxy
(normalised-softmax cross-entropy against one learned proxy per class, on the same
embeddings) and distillation from the shipped CNN (1 - cosine to its embedding of the same
canvas; a CNN teacher, as in DeiT), and clips its gradients.
Evaluation: Recall@1 by cosine of query canvases against a gallery of as many canvases, both
drawn from the held-out test digit split with a separate seed, and the embedding spread (mean
cosine between queries of the same and of different classes; about 1 for both means collapse).
CPU only; deterministic for a given torch version, CPU and thread count (2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.demo import canvas, model, vit
from pipeline.demo.model import INPUT_SIZE, MEAN, STD
from pipeline.io.images import to_model_tensor

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "assets"
THREADS = 2
Embeddings = tuple[torch.Tensor, np.ndarray]  # unit-norm (N, D), classes (N,)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    classes_per_batch: int = 10
    samples_per_class: int = 8
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 0.1
    proxy_weight: float = 0.0  # weight of the classification proxy loss; 0: SupCon alone
    distill_weight: float = 0.0  # weight of 1 - cosine to the shipped demo CNN's embedding; 0: no teacher
    grad_clip: float | None = None  # max gradient norm
    torch_seed: int = 0
    train_data_seed: int = 0
    eval_seed: int = 1
    eval_size: int = 1000
    log_every: int = 50


@dataclass(frozen=True)
class Recipe:
    """What differs between the demo's models: the network, its defaults, file and card."""

    factory: str  # ModelSpec arch that loads the shipped weights
    build: Callable[[], nn.Module]
    checkpoint: str  # file name in the output folder
    card: str
    config: TrainConfig
    architecture: dict
    unit_norm_output: bool  # forward() L2-normalises already

    def embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (B, D) of normalised images x, for training (normalising a unit-norm
        output again would change the CNN's training by rounding)."""
        z = net(x)
        return z if self.unit_norm_output else F.normalize(z, dim=1)


RECIPES = {
    "cnn": Recipe(
        factory="pipeline.demo.model:demo_model",
        build=model.DemoEmbeddingNet,
        checkpoint=model.CHECKPOINT,
        card="demo_model.json",
        config=TrainConfig(),
        architecture={
            "class": "DemoEmbeddingNet",
            "trunk": model.ARCHITECTURE,
            "head": f"AdaptiveAvgPool2d(1) -> Flatten -> Linear({model.FEATURE_CHANNELS}, {model.EMBEDDING_DIM}); "
                    "forward() L2-normalises",
            "target_layer": model.TARGET_LAYER,
            "feature_map": [model.FEATURE_CHANNELS, model.FEATURE_SIZE, model.FEATURE_SIZE],
            "embedding_layer": model.EMBEDDING_LAYER,
            "embedding_dim": model.EMBEDDING_DIM,
        },
        unit_norm_output=True,
    ),
    "vit": Recipe(
        factory="pipeline.demo.vit:demo_vit",
        build=vit.build_vit,
        checkpoint=vit.CHECKPOINT,
        card="demo_vit.json",
        config=TrainConfig(steps=1500, lr=1e-3, weight_decay=0.05, proxy_weight=1.0, distill_weight=1.0,
                           grad_clip=1.0),
        architecture={
            "class": "timm.models.vision_transformer.VisionTransformer",
            "trunk": vit.ARCHITECTURE,
            "head": f"final LayerNorm -> class token -> Linear({vit.WIDTH}, {vit.EMBEDDING_DIM}); "
                    "forward() returns the unnormalised embedding",
            "target_layer": vit.TARGET_LAYER,
            "feature_map": [vit.WIDTH, vit.PATCH_GRID_SIDE, vit.PATCH_GRID_SIDE],
            "prefix_tokens": 1,
            "embedding_layer": None,
            "embedding_dim": vit.EMBEDDING_DIM,
        },
        unit_norm_output=False,
    ),
}


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") of unit-norm z (B, D), labels (B,)."""
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # (B, B)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return -per_anchor.mean()


def proxy_loss(z: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-softmax cross-entropy of unit-norm z (B, D) against one proxy (10, D) per class."""
    return F.cross_entropy(z @ F.normalize(proxies, dim=1).T / temperature, labels)


def _batch(rng: np.random.Generator, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    classes = rng.permutation(10)[: cfg.classes_per_batch].repeat(cfg.samples_per_class)
    images, labels, _ = canvas.make_dataset(rng, len(classes), "train", INPUT_SIZE, classes)
    return to_model_tensor(images, MEAN, STD), torch.from_numpy(labels)  # (B, 3, S, S), (B,)


def train(recipe: Recipe, cfg: TrainConfig) -> tuple[nn.Module, list[float]]:
    """Train from scratch; returns the model (eval mode) and the loss of every step."""
    torch.manual_seed(cfg.torch_seed)
    rng = np.random.default_rng(cfg.train_data_seed)
    net = recipe.build().train()
    parameters = list(net.parameters())
    proxies = nn.Parameter(torch.randn(10, recipe.architecture["embedding_dim"])) if cfg.proxy_weight else None
    teacher = model.demo_model() if cfg.distill_weight else None
    opt = torch.optim.AdamW(parameters + ([proxies] if proxies is not None else []), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    # a 10 % warm-up, at least 2 steps: OneCycleLR divides by zero when a phase has no length
    warmup = min(0.5, max(0.1, 2 / cfg.steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=warmup)
    losses: list[float] = []
    for step in range(1, cfg.steps + 1):
        x, y = _batch(rng, cfg)
        z = recipe.embed(net, x)
        loss = supcon_loss(z, y, cfg.temperature)
        if proxies is not None:
            loss = loss + cfg.proxy_weight * proxy_loss(z, y, proxies, cfg.temperature)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = loss + cfg.distill_weight * (1 - (z * target).sum(dim=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"step {step:5d}/{cfg.steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}", flush=True)
    return net.eval(), losses



@torch.no_grad()
def embed(net: nn.Module, images: np.ndarray, chunk: int = 250) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> unit-norm embeddings (N, D)."""
    return torch.cat([F.normalize(net(to_model_tensor(images[i : i + chunk], MEAN, STD)), dim=1)
                      for i in range(0, len(images), chunk)])


def held_out(net: nn.Module, n: int, seed: int, split: str = "test") -> tuple[Embeddings, Embeddings]:
    """Embeddings of n query canvases and of n gallery canvases, drawn in that order from one Generator(seed)."""
    rng = np.random.default_rng(seed)
    q_img, q_lab, _ = canvas.make_dataset(rng, n, split, INPUT_SIZE)
    g_img, g_lab, _ = canvas.make_dataset(rng, n, split, INPUT_SIZE)
    return (embed(net, q_img), q_lab), (embed(net, g_img), g_lab)


def recall(queries: Embeddings, gallery: Embeddings) -> float:
    """Fraction of queries whose cosine-nearest gallery embedding has the same class."""
    nearest = (queries[0] @ gallery[0].T).argmax(1).numpy()  # (n,)
    return float(np.mean(gallery[1][nearest] == queries[1]))


def recall_at_1(net: nn.Module, n: int, seed: int, split: str = "test") -> float:
    """Recall@1 of n held-out query canvases against n gallery canvases (see held_out)."""
    return recall(*held_out(net, n, seed, split))


def spread(embeddings: Embeddings) -> dict[str, float]:
    """Mean cosine between embeddings of the same class and of different classes (both near 1: collapse)."""
    z, labels = embeddings
    cosine = (z @ z.T).numpy()
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    return {"mean_cosine_same_class": round(float(cosine[same & off_diagonal].mean()), 4),
            "mean_cosine_other_classes": round(float(cosine[~same].mean()), 4)}


def _card(recipe: Recipe, cfg: TrainConfig, net: nn.Module, losses: list[float], evaluation: dict,
          timing: dict, ckpt: Path) -> dict:
    data = ckpt.read_bytes()
    extras = [(cfg.proxy_weight, "proxy cross-entropy (normalised softmax, one learned proxy per class)"),
              (cfg.distill_weight, "(1 - cosine to the shipped demo CNN's embedding), the CNN as teacher")]
    return {
        "model": recipe.factory,
        "architecture": {
            **recipe.architecture,
            "input_size": INPUT_SIZE,
            "mean": list(MEAN),
            "std": list(STD),
            "parameters": sum(p.numel() for p in net.parameters()),
        },
        "training": {
            "steps": cfg.steps,
            "batch_size": cfg.classes_per_batch * cfg.samples_per_class,
            "classes_per_batch": cfg.classes_per_batch,
            "samples_per_class": cfg.samples_per_class,
            "loss": "supcon" + "".join(f" + {weight:g} x {term}" for weight, term in extras if weight),
            "temperature": cfg.temperature,
            "optimizer": "AdamW",
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            **({"grad_clip": cfg.grad_clip} if cfg.grad_clip is not None else {}),
            "schedule": "one-cycle (10 % warm-up, cosine decay)",
            "data": "fresh single-digit canvases each step, train digits (load_digits index % 5 != 0)",
            "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:])),
            **timing,
        },
        "seeds": {"torch": cfg.torch_seed, "train_data": cfg.train_data_seed, "eval": cfg.eval_seed},
        "evaluation": {
            **evaluation,
            "metric": "cosine",
            "queries": cfg.eval_size,
            "gallery": cfg.eval_size,
            "digits": "held-out test digits (load_digits index % 5 == 0), never seen in training",
            "protocol": "single-digit canvases, queries then gallery drawn from numpy Generator(eval seed); "
            "hit when the cosine-nearest gallery canvas has the query's class; spread over the queries",
        },
        "torch_version": torch.__version__,
        "checkpoint": {"file": ckpt.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }


def save(net: nn.Module, path: Path) -> None:
    """The float32 state_dict, as safetensors for a .safetensors path, else with torch.save."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


def parse_args(argv: list[str] | None) -> tuple[Recipe, TrainConfig, Path]:
    """The recipe of --model, its training settings overridden by the options given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="cnn", help="which demo model to train")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    overrides = ("steps", "eval_size", "classes_per_batch", "samples_per_class")
    for name in overrides:
        defaults = ", ".join(f"{model} {getattr(recipe.config, name)}" for model, recipe in RECIPES.items())
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: {defaults}")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.model]
    if args.steps is not None and args.steps < 3:
        parser.error("--steps must be at least 3 (a warm-up and an annealing phase)")
    given = {name: getattr(args, name) for name in overrides if getattr(args, name) is not None}
    return recipe, replace(recipe.config, **given), args.out_dir


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, write checkpoint and card; returns the card."""
    recipe, cfg, out_dir = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    net, losses = train(recipe, cfg)
    # wall time grows when other processes share the cores; so does cpu_time_s (all threads,
    # OpenMP spin-waits included), so the load average says how busy the machine was
    timing = {
        "wall_time_s": round(time.perf_counter() - wall, 1),
        "cpu_time_s": round(time.process_time() - cpu, 1),
        "threads": THREADS,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": round(load, 2),
    }
    queries, gallery = held_out(net, cfg.eval_size, cfg.eval_seed)
    evaluation = {"recall_at_1": recall(queries, gallery), "embedding_spread": spread(queries)}
    print(f"trained {cfg.steps} steps in {timing['wall_time_s']} s; held-out Recall@1 = {evaluation['recall_at_1']:.4f}; "
          f"spread {evaluation['embedding_spread']}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / recipe.checkpoint
    save(net, ckpt)
    card = _card(recipe, cfg, net, losses, evaluation, timing, ckpt)
    (out_dir / recipe.card).write_text(json.dumps(card, indent=2) + "\n")
    return card


if __name__ == "__main__":
    main()
