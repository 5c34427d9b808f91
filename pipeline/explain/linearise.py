"""Conservative propagation: the head with its normalisation statistics and gates held constant.

Gradient x activation through a LayerNorm of the target features sums to zero (LayerNorm is
scale invariant), so every CIS would vanish. As in conservative propagation (Ali et al.,
ICML 2022) and AttnLRP (Achtibat et al., ICML 2024), the head is linearised with, per image,
- each normalisation's deviation held constant: LayerNorm, GroupNorm, InstanceNorm (with the
  image's own statistics), RMSNorm, and any reciprocal square root (how hand-written RMSNorms,
  timm's among them, divide by theirs); a mean that is subtracted stays, it is linear,
- each norm (torch.norm, linalg.vector_norm), and each ratio of norms, held where it multiplies
  the features (ConvNeXt V2's global response normalisation, x * |x| / mean |x|); a norm used
  otherwise (L2 pooling) keeps its gradient,
- each attention's softmax weights held constant (queries and keys detached, values not),
- each gate held constant, the identity rule: GELU = x * Phi(x), SiLU = x * sigmoid(x),
  hard swish = x * hardsigmoid(x) and Mish = x * tanh(softplus(x)) with the right-hand factor
  fixed, and a sigmoid or hard sigmoid where it multiplies something (QuickGELU's
  x * sigmoid(1.702 x), the gates of squeeze-and-excitation blocks): its output, reshaped or
  not, is held in that product; a sigmoid used otherwise keeps its gradient,
- each gated linear unit, a held activation's output times another function of the features
  (SwiGLU MLPs: silu(x W) * (x V)), split by AttnLRP's uniform rule, half through each factor:
  a b = a b.detach() / 2 + a.detach() b / 2, so its degree-2 term is counted once, not twice
  (gradient x activation of a degree-2 term is twice the term). A factor depends on the
  features when it requires a gradient: the generic path builds its graph from the target
  features with the parameters frozen. Other products are left as they are: one whose factors'
  degrees add up to 1 (x times a scale-free ratio, as in global response normalisation) is
  exact without a rule.
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
_NORMS = (torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm)
# what keeps a statistic a statistic when it is computed from statistics and constants only
_STATISTIC_OPS = (torch.mean, torch.Tensor.mean, torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                  torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__, torch.clamp,
                  torch.Tensor.clamp, torch.Tensor.clamp_min, *_RESHAPES)
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)  # (query, key, value, ...)


class Linearised(TorchFunctionMode):
    """A torch function mode that linearises the head; use as a context manager."""

    def __init__(self, unit_statistics: bool = False) -> None:
        super().__init__()
        self.active = False
        self.unit_statistics = unit_statistics
        self.deviations: list[torch.Tensor] = []  # each held normalisation's sigma, e.g. (B, ..., 1)
        self._gates: dict[int, weakref.ref] = {}  # id -> the sigmoid outputs (and their reshapes) seen
        self._activations: dict[int, weakref.ref] = {}  # id -> the held activations' outputs (GELU, SiLU, ...)
        self._statistics: dict[int, weakref.ref] = {}  # id -> norms of the features, and ratios of them

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
        if func in _SOFTMAX:
            return func(*args, **kwargs).detach()
        if func in _SIGMOID or (func in _RESHAPES and _seen(self._gates, args[0])):
            return _track(self._gates, func(*args, **kwargs))
        if func in _NORMS or (func in _STATISTIC_OPS and self._of_statistics(args)):
            return _track(self._statistics, func(*args, **kwargs))
        if func in _PRODUCTS or func in _IN_PLACE_PRODUCTS:
            first = 1 if func in _IN_PLACE_PRODUCTS else 0
            args = tuple(a.detach() if i >= first and self._held_factor(a) else a for i, a in enumerate(args))
            if func in _PRODUCTS and self._is_gated_unit(args):
                a, b = args  # the uniform rule; halves, so that 16-bit values stay the product's own
                return func(a, b.detach()) * 0.5 + func(a.detach(), b) * 0.5
            return func(*args, **kwargs)
        if func in _ATTENTION:
            return _attention(func, args, kwargs)
        if func in _ACTIVATIONS:
            return _track(self._activations, _ACTIVATIONS[func](*args, **kwargs))
        return func(*args, **kwargs)

    def _held_factor(self, value: object) -> bool:
        """A gate, or a statistic (global response normalisation's x * |x| / mean |x|): held where it multiplies."""
        return _seen(self._gates, value) or _seen(self._statistics, value)

    def _of_statistics(self, args: tuple) -> bool:
        """Whether an operation's tensors are statistics, or constants beside at least one."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        statistics = [_seen(self._statistics, a) for a in tensors]
        return any(statistics) and all(seen or not a.requires_grad for a, seen in zip(tensors, statistics))

    def _is_gated_unit(self, factors: tuple) -> bool:
        """A held activation's output times another function of the features: silu(x W) * (x V)."""
        return (len(factors) == 2 and all(isinstance(f, torch.Tensor) and f.requires_grad for f in factors)
                and any(_seen(self._activations, f) for f in factors))

    def _held(self, deviation: torch.Tensor) -> torch.Tensor:
        """A normalisation's deviation, held: detached, recorded, and 1 when probing."""
        held = torch.ones_like(deviation) if self.unit_statistics else deviation.detach()
        self.deviations.append(held)
        return held

    def _standardise(self, x: torch.Tensor, dims: tuple[int, ...], eps: float, centre: bool = True) -> torch.Tensor:
        """x (minus its mean over `dims` where `centre`) over its held deviation over `dims`."""
        centred = x - x.mean(dim=dims, keepdim=True) if centre else x
        variance = centred.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(dim=dims, keepdim=True)
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


def _track(registry: dict[int, weakref.ref], output: torch.Tensor) -> torch.Tensor:
    registry[id(output)] = weakref.ref(output)
    return output


def _seen(registry: dict[int, weakref.ref], value: object) -> bool:
    seen = registry.get(id(value))
    return seen is not None and seen() is value


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


_ACTIVATIONS = {  # the identity rule: x times its own gate, the gate held
    F.gelu: _gelu,
    F.silu: lambda x, inplace=False: x * torch.sigmoid(x).detach(),
    F.hardswish: lambda x, inplace=False: x * F.hardsigmoid(x).detach(),
    F.mish: lambda x, inplace=False: x * torch.tanh(F.softplus(x)).detach(),
}
