"""A tiny embedding CNN for the job's benchmarks: explaining with it costs almost nothing, so they
time what surrounds the model (decoding, rendering, writing, Ray).

Its own module, so that the job's actors import it without the benchmarks' dependencies.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pipeline.models.spec import ModelSpec

EMBEDDING_DIM = 16


def tiny_embedder() -> nn.Module:
    """Two convolutions (stride 8, then 2), average pooling and a linear head: 14x14 maps at 224 px."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, kernel_size=8, stride=8), stem_relu=nn.ReLU(),
        features=nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1), features_relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(32, EMBEDDING_DIM),
    )).eval()


def tiny_spec(input_size: int = 224) -> ModelSpec:
    """The job's model section for the tiny embedder at `input_size` pixels (random weights)."""
    return ModelSpec(arch="jobs.tiny_model:tiny_embedder", target_layer="features", input_size=input_size)
