"""jobs/baselines.py: the project's Grad-CAM of the similarity agrees with pytorch-grad-cam run
through the benchmarks' adapter (its embedding tutorial's recipe)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from jobs.baselines import concept_maps, gradcam_similarity, library_cam, mean_activation, random_map, resolve
from pipeline import SFAM


def test_gradcam_matches_pytorch_grad_cam(rng: np.random.Generator) -> None:
    torch.manual_seed(int(rng.integers(2**31)))
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, 32)
    model.eval()
    x, y = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    ours = gradcam_similarity(model, "layer4", x, y)  # (3, 2, 2)
    with torch.no_grad():
        concepts = model(y)
    with library_cam(model, resolve(SFAM(model, "layer4"), x)) as cam:
        theirs = torch.from_numpy(concept_maps(cam, x, concepts))  # (3, 64, 64)
    upsampled = F.interpolate(ours[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    for mine, other in zip(upsampled, theirs):
        if mine.max() <= 0:  # both empty after ReLU
            assert other.max() <= 1e-6
            continue
        mine = (mine - mine.min()) / (mine.max() - mine.min())
        assert torch.corrcoef(torch.stack([mine.flatten(), other.flatten().float()]))[0, 1] > 0.98


def test_mean_and_random_maps_have_feature_shape() -> None:
    features = torch.randn(4, 8, 5, 6)
    assert mean_activation(features).shape == random_map(features).shape == (4, 5, 6)
    torch.testing.assert_close(mean_activation(features), features.mean(1))
