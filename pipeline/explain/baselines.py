"""Baselines to compare SFAM against (benchmarks only, never the product's default).

- Grad-CAM of the similarity score, as pytorch-grad-cam's embedding tutorial does it: the
  partner's embedding is a fixed concept, s = metric(u^x, u^y) is differentiated with respect
  to the query's feature map, channel weights are the spatial mean of that gradient.
- The mean activation over channels: a class- and partner-agnostic saliency map.
- A random map.
All return (P, h, w) float32 maps at feature resolution, for the query side of each pair.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.explain.layers import check_choice, embeddings_of, find_module, hooked_output
from pipeline.explain.metrics import METRICS, Metric, similarity


def _embeddings(model: nn.Module, embedding_layer: str | None, images: torch.Tensor) -> torch.Tensor:
    embedding = None if embedding_layer is None else find_module(model, embedding_layer, "embedding_layer")
    return embeddings_of(model, embedding, images)


def gradcam_similarity(
    model: nn.Module, target_layer: str, x: torch.Tensor, y: torch.Tensor,
    metric: Metric = "cosine", embedding_layer: str | None = None,
) -> torch.Tensor:
    """Grad-CAM maps of x for s(x, y), y's embedding held fixed: (B, h, w)."""
    check_choice("metric", metric, METRICS)
    target = find_module(model, target_layer)
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            concept = _embeddings(model, embedding_layer, y.clone()).detach()
        with hooked_output(target) as features:
            u = _embeddings(model, embedding_layer, x.clone())
        (gradient,) = torch.autograd.grad(similarity(metric, u, concept).sum(), features[-1])
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    return (weights * features[-1].detach()).sum(dim=1).relu().float()


def mean_activation(features: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B, h, w): the channel mean of the feature map."""
    return features.float().mean(dim=1)


def random_map(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K, h, w) -> (B, h, w) uniform noise on the features' device, the chance baseline."""
    batch, _, height, width = features.shape
    device = generator.device if generator is not None else features.device  # where the generator draws
    return torch.rand(batch, height, width, generator=generator, device=device).to(features.device)
