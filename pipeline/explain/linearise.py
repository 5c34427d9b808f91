"""Conservative propagation: the head with its normalisation statistics and gates held constant.

Gradient x activation through a LayerNorm of the target features sums to zero (LayerNorm is
scale invariant), so every CIS would vanish. As in conservative propagation (Ali et al.,
ICML 2022) and AttnLRP (Achtibat et al., ICML 2024), the head is linearised with, per image,
- each LayerNorm's standard deviation held constant (its mean stays: that part is linear),
- each attention's softmax weights held constant (queries and keys detached, values not),
- each GELU / SiLU gate held constant (x * Phi(x) with Phi(x) fixed: the identity rule).
With these held, every LayerNorm / attention / MLP is affine in its input, the values stay
exactly the model's, and gradient x activation sums to u . v minus the biases' share.

Only operations after the target layer are changed: `Linearised.active` is switched on by
the target layer's hook. The mode also records the held LayerNorm deviations, which the
fast path needs (a pooled-LayerNorm + Linear head is affine in GAP(A) up to one 1/sigma
per image), and with `unit_statistics` replaces them by 1, which is how that head is probed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


class Linearised(TorchFunctionMode):
    """A torch function mode that linearises the head; use as a context manager."""

    def __init__(self, unit_statistics: bool = False) -> None:
        super().__init__()
        self.active = False
        self.unit_statistics = unit_statistics
        self.deviations: list[torch.Tensor] = []  # each held LayerNorm's sigma, (B, ..., 1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func in _SOFTMAX:
            return func(*args, **kwargs).detach()
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            query, key, *rest = args
            return func(query.detach(), key.detach(), *rest, **kwargs)
        if func is F.gelu:
            return _gelu(*args, **kwargs)
        if func is F.silu:
            return args[0] * torch.sigmoid(args[0]).detach()
        return func(*args, **kwargs)

    def _layer_norm(
        self, x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, eps: float = 1e-5,
    ) -> torch.Tensor:
        dims = tuple(range(-len(normalized_shape), 0))
        centred = x - x.mean(dim=dims, keepdim=True)
        if self.unit_statistics:
            deviation = torch.ones_like(centred[(..., *([slice(0, 1)] * len(dims)))])
        else:
            variance = centred.float().pow(2).mean(dim=dims, keepdim=True)
            deviation = (variance + eps).sqrt().to(x.dtype).detach()
        self.deviations.append(deviation)
        out = centred / deviation
        if weight is not None:
            out = out * weight
        return out + bias if bias is not None else out


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x) = x * Phi(x) with the gate Phi(x) held constant."""
    if approximate == "tanh":
        gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
    else:
        gate = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * gate.detach()
