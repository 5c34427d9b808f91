"""The fast path's head: u = (J a) / sigma + c, measured once from the model itself.

The head is everything between the target layer's feature map A (N, K, h, w) and the
embedding u (N, D). When it is affine in a = GAP(A) (pooling, Flatten, Linear, BatchNorm1d
and Dropout in eval mode, Identity), feeding it the constant maps 0 and e_k gives c and the
columns of J exactly, whatever its modules are called or how they are nested.

A head with one LayerNorm of the pooled vector (ConvNeXt: GAP -> LayerNorm -> Linear) is
affine too once that LayerNorm's deviation sigma is held per image (linearise.py): it is
probed with sigma = 1, which gives J and c, and image x then has u^x = J a^x / sigma^x + c.
The result is accepted only if it reproduces the model's own embeddings of real images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PROBE_CHUNK = 256  # unit maps per probing forward; bounds memory for large K


@dataclass(frozen=True)
class AffineHead:
    jacobian: torch.Tensor  # (D, K) float64, J at sigma = 1
    bias: torch.Tensor  # (D,) float64

    def __call__(self, pooled: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """u = (J a) * scale + c for pooled features (N, K) and scale = 1 / sigma (N,) -> (N, D)."""
        return (pooled.double() @ self.jacobian.T) * scale[:, None] + self.bias

    def explains(self, features: torch.Tensor, embeddings: torch.Tensor, scale: torch.Tensor) -> bool:
        """Whether u == J GAP(A) / sigma + c for the model's A (N, K, h, w), u (N, D) and 1 / sigma (N,)."""
        predicted = self(features.double().mean(dim=(2, 3)), scale.to(features.device))
        error = (predicted - embeddings.double()).norm(dim=1) / embeddings.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        return bool(error.max() <= relative_tolerance(features.dtype))

    def to(self, device: torch.device) -> AffineHead:
        return AffineHead(self.jacobian.to(device), self.bias.to(device))


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far a float computation in `dtype` may stray from exact before it counts as different."""
    return 2e-2 if torch.finfo(dtype).bits <= 16 else 1e-4


def has_unit_norm(embeddings: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every row of (N, D) embeddings computed in `dtype` has norm 1, up to its rounding."""
    return bool(((embeddings.double().norm(dim=1) - 1).abs() < relative_tolerance(dtype)).all())


def per_image_scale(deviations: list[torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor | None:
    """1 / sigma (N,) float64 from the head's held LayerNorm deviations (ones without any), or
    None when the head is not of the fast path's form (more than one deviation per image)."""
    if not deviations:
        return torch.ones(embeddings.shape[0], dtype=torch.float64, device=embeddings.device)
    if len(deviations) != 1 or deviations[0].numel() != embeddings.shape[0]:
        return None
    return 1.0 / deviations[0].double().flatten()


def measure_affine_head(
    run_head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    embeddings: torch.Tensor,
    scale: torch.Tensor,
) -> AffineHead | None:
    """J and c of the head, or None when the head is not affine in GAP(A) (with sigma held).

    run_head: maps a replacement feature map (M, K, h, w) to the embeddings (M, D) the model
        computes from it, with the head's LayerNorm deviations set to 1.
    features, embeddings, scale: the model's A (N, K, h, w), u (N, D) and 1 / sigma (N,) for
        real images, used to check that u == J GAP(A) / sigma + c.
    """
    _, channels, height, width = features.shape
    probes = torch.cat([features.new_zeros(1, channels), torch.eye(channels, dtype=features.dtype, device=features.device)])
    try:
        outputs = [
            run_head(chunk[:, :, None, None].expand(-1, -1, height, width))
            for chunk in probes.split(PROBE_CHUNK)
        ]
    except Exception:  # the head does not take a batch of constant maps (its own checks may raise anything)
        return None
    responses = torch.cat(outputs).double()  # (K + 1, D)
    head = AffineHead(jacobian=(responses[1:] - responses[:1]).T.contiguous(), bias=responses[0])
    return head if head.explains(features, embeddings, scale) else None
