"""Train the built-in demo's metric-learning model and write its checkpoint and card.

    python -m jobs.train_demo_model [--steps N] [--out-dir DIR] [--eval-size N]
                                    [--classes-per-batch N] [--samples-per-class N]

Supervised contrastive loss (SupCon) on the L2-normalised embeddings of fresh
cluttered canvases each step (train digit split; every batch holds
samples-per-class canvases of each of classes-per-batch random classes).
Evaluation: Recall@1 by cosine of query canvases against a gallery of as many
canvases, both drawn from the held-out test digit split with a separate seed.
CPU only; deterministic for a given torch version, CPU and thread count (2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import canvas
from pipeline.demo.model import (
    ARCHITECTURE,
    CHECKPOINT,
    EMBEDDING_DIM,
    EMBEDDING_LAYER,
    FEATURE_CHANNELS,
    FEATURE_SIZE,
    INPUT_SIZE,
    MEAN,
    STD,
    TARGET_LAYER,
    DemoEmbeddingNet,
)
from pipeline.io.images import to_model_tensor

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "assets"
CARD = "demo_model.json"
THREADS = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    classes_per_batch: int = 10
    samples_per_class: int = 8
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 0.1
    torch_seed: int = 0
    train_data_seed: int = 0
    eval_seed: int = 1
    eval_size: int = 1000
    log_every: int = 50


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") of unit-norm z (B, D), labels (B,)."""
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))  # (B, B)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return -per_anchor.mean()


def _batch(rng: np.random.Generator, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    classes = rng.permutation(10)[: cfg.classes_per_batch].repeat(cfg.samples_per_class)
    images, labels, _ = canvas.make_dataset(rng, len(classes), "train", INPUT_SIZE, classes)
    return to_model_tensor(images, MEAN, STD), torch.from_numpy(labels)  # (B, 3, S, S), (B,)


def train(cfg: TrainConfig) -> tuple[DemoEmbeddingNet, list[float]]:
    """Train from scratch; returns the model (eval mode) and the loss of every step."""
    torch.manual_seed(cfg.torch_seed)
    rng = np.random.default_rng(cfg.train_data_seed)
    model = DemoEmbeddingNet().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    losses: list[float] = []
    for step in range(1, cfg.steps + 1):
        x, y = _batch(rng, cfg)
        loss = supcon_loss(model(x), y, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"step {step:5d}/{cfg.steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}", flush=True)
    return model.eval(), losses


@torch.no_grad()
def embed(model: DemoEmbeddingNet, images: np.ndarray, chunk: int = 250) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> unit-norm embeddings (N, D)."""
    return torch.cat([model(to_model_tensor(images[i : i + chunk], MEAN, STD)) for i in range(0, len(images), chunk)])


def recall_at_1(model: DemoEmbeddingNet, n: int, seed: int, split: str = "test") -> float:
    """Fraction of n query canvases whose cosine-nearest of n gallery canvases has the same class.
    Queries are drawn first, then the gallery, from one Generator(seed)."""
    rng = np.random.default_rng(seed)
    q_img, q_lab, _ = canvas.make_dataset(rng, n, split, INPUT_SIZE)
    g_img, g_lab, _ = canvas.make_dataset(rng, n, split, INPUT_SIZE)
    nearest = (embed(model, q_img) @ embed(model, g_img).T).argmax(1).numpy()  # (n,)
    return float(np.mean(g_lab[nearest] == q_lab))


def _card(cfg: TrainConfig, model: DemoEmbeddingNet, losses: list[float], recall: float, timing: dict, ckpt: Path) -> dict:
    data = ckpt.read_bytes()
    return {
        "model": "pipeline.demo.model:demo_model",
        "architecture": {
            "class": "DemoEmbeddingNet",
            "trunk": ARCHITECTURE,
            "head": f"AdaptiveAvgPool2d(1) -> Flatten -> Linear({FEATURE_CHANNELS}, {EMBEDDING_DIM}); forward() L2-normalises",
            "target_layer": TARGET_LAYER,
            "feature_map": [FEATURE_CHANNELS, FEATURE_SIZE, FEATURE_SIZE],
            "embedding_layer": EMBEDDING_LAYER,
            "embedding_dim": EMBEDDING_DIM,
            "input_size": INPUT_SIZE,
            "mean": list(MEAN),
            "std": list(STD),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training": {
            "steps": cfg.steps,
            "batch_size": cfg.classes_per_batch * cfg.samples_per_class,
            "classes_per_batch": cfg.classes_per_batch,
            "samples_per_class": cfg.samples_per_class,
            "loss": "supcon",
            "temperature": cfg.temperature,
            "optimizer": "AdamW",
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "schedule": "one-cycle (10 % warm-up, cosine decay)",
            "data": "fresh single-digit canvases each step, train digits (load_digits index % 5 != 0)",
            "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:])),
            **timing,
        },
        "seeds": {"torch": cfg.torch_seed, "train_data": cfg.train_data_seed, "eval": cfg.eval_seed},
        "evaluation": {
            "recall_at_1": recall,
            "metric": "cosine",
            "queries": cfg.eval_size,
            "gallery": cfg.eval_size,
            "digits": "held-out test digits (load_digits index % 5 == 0), never seen in training",
            "protocol": "single-digit canvases, queries then gallery drawn from numpy Generator(eval seed); "
            "hit when the cosine-nearest gallery canvas has the query's class",
        },
        "torch_version": torch.__version__,
        "checkpoint": {"file": ckpt.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, write checkpoint and card; returns the card."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--eval-size", type=int, default=TrainConfig.eval_size)
    parser.add_argument("--classes-per-batch", type=int, default=TrainConfig.classes_per_batch)
    parser.add_argument("--samples-per-class", type=int, default=TrainConfig.samples_per_class)
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        steps=args.steps,
        eval_size=args.eval_size,
        classes_per_batch=args.classes_per_batch,
        samples_per_class=args.samples_per_class,
    )

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    model, losses = train(cfg)
    # wall time grows when other processes share the cores; so does cpu_time_s (all threads,
    # OpenMP spin-waits included), so the load average says how busy the machine was
    timing = {
        "wall_time_s": round(time.perf_counter() - wall, 1),
        "cpu_time_s": round(time.process_time() - cpu, 1),
        "threads": THREADS,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": round(load, 2),
    }
    recall = recall_at_1(model, cfg.eval_size, cfg.eval_seed)
    print(f"trained {cfg.steps} steps in {timing['wall_time_s']} s; held-out Recall@1 = {recall:.4f}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.out_dir / CHECKPOINT
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, ckpt)
    card = _card(cfg, model, losses, recall, timing, ckpt)
    (args.out_dir / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


if __name__ == "__main__":
    main()
