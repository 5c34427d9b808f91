"""The project's Grad-CAM of the similarity agrees with pytorch-grad-cam's embedding recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.explain.baselines import gradcam_similarity, mean_activation, random_map

from reference import resnet18_embedding

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")


class SimilarityToConcept:
    """pytorch-grad-cam's embedding-tutorial target: cosine similarity to a fixed embedding."""

    def __init__(self, concept: torch.Tensor) -> None:
        self.concept = concept

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(output, self.concept, dim=0)


def test_gradcam_matches_pytorch_grad_cam(seed: int) -> None:
    model = resnet18_embedding()
    x, y = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ours = gradcam_similarity(model, "layer4", x, y)  # (3, 2, 2)
    with torch.no_grad():
        concepts = model(y)
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.layer4]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[SimilarityToConcept(c) for c in concepts]))
    upsampled = F.interpolate(ours[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    for mine, other in zip(upsampled, theirs):
        if mine.max() <= 0:  # both empty after ReLU
            assert other.max() <= 1e-6
            continue
        mine = (mine - mine.min()) / (mine.max() - mine.min())
        assert torch.corrcoef(torch.stack([mine.flatten(), other.flatten().float()]))[0, 1] > 0.98


def test_mean_and_random_maps_have_feature_shape(seed: int) -> None:
    features = torch.randn(4, 8, 5, 6)
    assert mean_activation(features).shape == random_map(features).shape == (4, 5, 6)
    torch.testing.assert_close(mean_activation(features), features.mean(1))
