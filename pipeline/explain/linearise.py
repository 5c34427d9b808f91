"""Conservative propagation: the head with its normalisation statistics and gates held constant.

Gradient x activation through a LayerNorm of the target features sums to zero (LayerNorm is
scale invariant), so every CIS would vanish. As in conservative propagation (Ali et al.,
ICML 2022) and AttnLRP (Achtibat et al., ICML 2024), the head is linearised with, per image,
- each normalisation's deviation held constant: LayerNorm, GroupNorm, InstanceNorm (with the
  image's own statistics), RMSNorm, and any reciprocal square root (how hand-written RMSNorms,
  timm's among them, divide by theirs); a mean that is subtracted stays, it is linear; any
  norm (torch.norm, linalg.vector_norm: ConvNeXt V2's global response normalisation),
- each attention's softmax weights held constant (queries and keys detached, values not),
- each gate held constant, the identity rule: GELU = x * Phi(x), SiLU = x * sigmoid(x),
  hard swish = x * hardsigmoid(x) and Mish = x * tanh(softplus(x)) with the right-hand factor
  fixed, and a sigmoid or hard sigmoid where it multiplies something (QuickGELU's
  x * sigmoid(1.702 x), the gates of squeeze-and-excitation blocks): its output, reshaped or
  not, is held in that product; a sigmoid used otherwise keeps its gradient,
- each product of two factors that both depend on the target features (the gated linear units
  of SwiGLU MLPs, silu(x W) * (x V)) split by AttnLRP's uniform rule, half through each factor:
  a b = (a b.detach() + a.detach() b) / 2, so the product's share is counted once, not twice
  (gradient x activation of a degree-2 term is twice the term). A factor depends on the
  features when it has a grad_fn: the generic path builds its graph from the target features
  with the parameters frozen.
With these held, every normalisation / attention / MLP is affine in its input, the values stay
exactly the model's, and gradient x activation sums to u . v minus the biases' share.

Only operations after the target layer are changed: `Linearised.active` is switched on by
the target layer's hook. The mode also records the held deviations, which the fast path needs
(a pooled-LayerNorm + Linear head is affine in GAP(A) up to one 1/sigma per image), and with
`unit_statistics` replaces them by 1, which is how that head is probed.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
_SIGMOID = (torch.sigmoid, torch.Tensor.sigmoid, F.hardsigmoid)
_RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unsqueeze, torch.unsqueeze,
             torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.flatten, torch.flatten, torch.Tensor.__getitem__)
_PRODUCTS = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_IN_PLACE_PRODUCTS = (torch.Tensor.mul_, torch.Tensor.__imul__)  # the first factor is written to: never held
_RSQRT = (torch.rsqrt, torch.Tensor.rsqrt)
_NORMS = (torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm)  # statistics, as deviations are
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)  # (query, key, value, ...)


class Linearised(TorchFunctionMode):
    """A torch function mode that linearises the head; use as a context manager."""

    def __init__(self, unit_statistics: bool = False) -> None:
        super().__init__()
        self.active = False
        self.unit_statistics = unit_statistics
        self.deviations: list[torch.Tensor] = []  # each held normalisation's sigma, e.g. (B, ..., 1)
        self._gates: dict[int, weakref.ref] = {}  # id -> the sigmoid outputs (and their reshapes) seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return self._group_norm(*args, **kwargs)
        if func is F.instance_norm:
            return self._instance_norm(*args, **kwargs)
        if func is F.rms_norm:
            return self._rms_norm(*args, **kwargs)
        if func in _RSQRT:
            return 1 / self._held(1 / func(*args, **kwargs))
        if func in _NORMS:  # global response normalisation's x * |x| / mean |x| (ConvNeXt V2), F.normalize
            return func(*args, **kwargs).detach()
        if func in _SOFTMAX:
            return func(*args, **kwargs).detach()
        if func in _SIGMOID or (func in _RESHAPES and self._is_gate(args[0])):
            return self._gate(func(*args, **kwargs))
        if func in _PRODUCTS or func in _IN_PLACE_PRODUCTS:
            first = 1 if func in _IN_PLACE_PRODUCTS else 0
            args = tuple(a.detach() if i >= first and self._is_gate(a) else a for i, a in enumerate(args))
            if func in _PRODUCTS and len(args) == 2 and all(getattr(a, "grad_fn", None) is not None for a in args):
                a, b = args
                return (func(a, b.detach()) + func(a.detach(), b)) / 2  # the uniform rule: the product's value
            return func(*args, **kwargs)
        if func in _ATTENTION:
            return _attention(func, args, kwargs)
        if func is F.gelu:
            return _gelu(*args, **kwargs)
        if func is F.silu:
            return args[0] * torch.sigmoid(args[0]).detach()
        if func is F.hardswish:
            return args[0] * F.hardsigmoid(args[0]).detach()
        if func is F.mish:
            return args[0] * torch.tanh(F.softplus(args[0])).detach()
        return func(*args, **kwargs)

    def _gate(self, output: torch.Tensor) -> torch.Tensor:
        self._gates[id(output)] = weakref.ref(output)
        return output

    def _is_gate(self, value: object) -> bool:
        seen = self._gates.get(id(value))
        return seen is not None and seen() is value

    def _held(self, deviation: torch.Tensor) -> torch.Tensor:
        """A normalisation's deviation, held: detached, recorded, and 1 when probing."""
        held = torch.ones_like(deviation) if self.unit_statistics else deviation.detach()
        self.deviations.append(held)
        return held

    def _standardise(self, x: torch.Tensor, dims: tuple[int, ...], eps: float, centre: bool = True) -> torch.Tensor:
        """x (minus its mean over `dims` where `centre`) over its held deviation over `dims`."""
        centred = x - x.mean(dim=dims, keepdim=True) if centre else x
        variance = centred.float().pow(2).mean(dim=dims, keepdim=True)
        return centred / self._held((variance + eps).sqrt().to(x.dtype))

    def _layer_norm(
        self, x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, eps: float = 1e-5,
    ) -> torch.Tensor:
        out = self._standardise(x, tuple(range(-len(normalized_shape), 0)), eps)
        return _affine(out, weight, bias)

    def _rms_norm(
        self, x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None, eps: float | None = None,
    ) -> torch.Tensor:
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps if eps is None else eps  # as F.rms_norm
        return _affine(self._standardise(x, tuple(range(-len(normalized_shape), 0)), eps, centre=False), weight, None)

    def _group_norm(
        self, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, eps: float = 1e-5,
    ) -> torch.Tensor:
        """x (N, C, *): statistics over each group of C / num_groups channels and all positions."""
        grouped = self._standardise(x.reshape(x.shape[0], num_groups, -1), (2,), eps).reshape(x.shape)
        return _affine(grouped, *_per_channel(x, weight, bias))

    def _instance_norm(
        self, x: torch.Tensor, running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, use_input_stats: bool = True,
        momentum: float = 0.1, eps: float = 1e-5,
    ) -> torch.Tensor:
        """x (N, C, *): with running statistics it is affine already; with the image's own, a
        GroupNorm of one channel per group."""
        if not use_input_stats:
            return F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
        return self._group_norm(x, x.shape[1], weight, bias, eps)


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    out = x * weight if weight is not None else x
    return out + bias if bias is not None else out


def _per_channel(x: torch.Tensor, *parameters: torch.Tensor | None) -> list[torch.Tensor | None]:
    """(C,) parameters shaped to broadcast over x (N, C, *)."""
    shape = (-1, *[1] * (x.dim() - 2))
    return [None if p is None else p.view(shape) for p in parameters]


def _attention(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """`func` with its queries and keys detached, passed by position or by name, so its
    softmax weights are constants."""
    args, kwargs = list(args), dict(kwargs)
    for position, name in enumerate(("query", "key")):
        if position < len(args):
            args[position] = args[position].detach()
        else:
            kwargs[name] = kwargs[name].detach()
    return func(*args, **kwargs)


def _gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x) = x * Phi(x) with the gate Phi(x) held constant."""
    if approximate == "tanh":
        gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
    else:
        gate = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * gate.detach()
