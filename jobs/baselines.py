"""What SFAM is compared against in the benchmarks (never the product's default).

- Grad-CAM of the similarity score, as pytorch-grad-cam's embedding tutorial does it: the
  partner's embedding is a fixed concept, s = metric(u^x, u^y) is differentiated with respect
  to the query's feature map, channel weights are the spatial mean of that gradient
  (`gradcam_similarity`, on (B, C, h, w) layers).
- pytorch-grad-cam itself, run that way (`library_cam`, `concept_maps`) on any feature layout the
  explainer reads: it expects (B, C, h, w) activations, and for a ViT its users write a
  `reshape_transform` from tokens to maps by hand; here that transform is the explainer's own
  layout adapter (pipeline/explain/layout.py), so both methods read the same patch grid.
- The mean activation over channels, a class- and partner-agnostic saliency map, and a random map.
The project's maps are (P, h, w) float32 at feature resolution, for the query side of each pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from torch import nn

from pipeline import SFAM
from pipeline.explain.layers import check_choice, embeddings_of, find_module, hooked_output
from pipeline.explain.layout import FeatureLayout
from pipeline.explain.metrics import METRICS, Metric, similarity

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


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


class CosineToConcept:
    """pytorch-grad-cam target of its embedding tutorial: cosine of the output to a fixed embedding."""

    def __init__(self, concept: torch.Tensor) -> None:
        self.concept = concept

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.concept, dim=0)


def reshape_transform(layout: FeatureLayout) -> ReshapeTransform | None:
    """The `reshape_transform` pytorch-grad-cam needs for a layer of this layout (None for maps)."""
    return None if layout.kind == "nchw" else layout.to_maps


def resolve(explainer: SFAM, sample: torch.Tensor) -> SFAM:
    """The explainer with its target layer and layout chosen on `sample` (the default layer when none was given)."""
    explainer.features(sample[:1])
    return explainer


@contextmanager
def library_cam(model: nn.Module, explainer: SFAM) -> Iterator[GradCAM]:
    """pytorch-grad-cam's GradCAM on the resolved explainer's target layer, hooks and gradients
    removed on exit so that other measurements run on a hook-free model."""
    layer = model.get_submodule(explainer.target_layer)
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape_transform(explainer.layout)) as cam:
        yield cam
    model.zero_grad(set_to_none=True)


def concept_maps(cam: GradCAM, x: torch.Tensor, concepts: torch.Tensor) -> np.ndarray:
    """(B, H, W) maps of x for the cosine to each image's concept (B, D), min-max scaled by the library."""
    return cam(input_tensor=x, targets=[CosineToConcept(c) for c in concepts])
