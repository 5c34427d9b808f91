"""The demo's metric-learning model: a small conv trunk with a linear embedding head.

Structure after the target layer is exactly pooling -> flatten -> fc, and forward()
L2-normalises the fc output, so the explainer takes `embedding_layer=EMBEDDING_LAYER`
(the unnormalised embedding) and the affine-head fast path applies.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 64
MEAN = (0.28, 0.28, 0.28)  # demo input normalisation of RGB in [0, 1] (canvas statistics)
STD = (0.18, 0.18, 0.18)
EMBEDDING_DIM = 64
FEATURE_CHANNELS = 128
FEATURE_SIZE = 16  # target-layer map side at INPUT_SIZE
TARGET_LAYER = "features.block4"  # last conv block; (B, 128, 16, 16) at 64 px
EMBEDDING_LAYER = "fc"
CHECKPOINT = "demo_model.pt"  # in pipeline/assets
ARCHITECTURE = "conv3x3-BN-ReLU x7 in 4 blocks: [16/2, 16] [32/2, 32] [64, 64] [128] (channels/stride)"


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DemoEmbeddingNet(nn.Module):
    """(B, 3, 64, 64) normalised images -> (B, 64) unit-norm embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=nn.Sequential(*_conv(3, 16, 2), *_conv(16, 16)),  # (B, 16, 32, 32)
                block2=nn.Sequential(*_conv(16, 32, 2), *_conv(32, 32)),  # (B, 32, 16, 16)
                block3=nn.Sequential(*_conv(32, 64), *_conv(64, 64)),  # (B, 64, 16, 16)
                block4=nn.Sequential(*_conv(64, FEATURE_CHANNELS)),  # (B, 128, 16, 16), TARGET_LAYER
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(FEATURE_CHANNELS, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.flatten(self.pool(self.features(x)))  # (B, 128)
        return F.normalize(self.fc(a), dim=1)  # (B, 64)


def demo_model(pretrained: bool = True) -> DemoEmbeddingNet:
    """The demo model in eval mode, with the shipped weights unless `pretrained=False`."""
    model = DemoEmbeddingNet()
    if pretrained:
        with (resources.files("pipeline") / "assets" / CHECKPOINT).open("rb") as f:
            model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return model.eval()
