"""SFAM: channel-wise contribution importance scores (CIS) and Similar Feature Activation Maps.

The formulas are this project's derivation from the abstracts of Liao et al., "Visual
Explanation via Similar Feature Activation for Metric Learning" (arXiv 2506.01636) and
its predecessor FAM (arXiv 2307.05017); see docs/method.md. For an image x with
target-layer features A^x (K, h, w), pooled features a^x = GAP(A^x) and embedding
u^x = J^x a^x + c^x, given its partner y:

    w^{x|y}   = J^x^T v^{x|y}          v: the metric's partner vector (metrics.py)
    CIS^{x|y} = a^x * w^{x|y}          sum_k CIS_k + residual = s(x, y)
    SFAM^x    = ReLU(sum_k |a_k| w_k / sum_k |CIS_k| * A^x_k)  weighting="cis" (|a_k| w_k = CIS_k where a >= 0)
    map^x     = sum_k w_k A^x_k                                 weighting="partner"
    M^x       = shared evidence from correspondences of the local embeddings J^x A^x(:, p)
                with y's (correspondence.py)                    weighting="matched"

When the head does not pool first (class-token attention), a channel's weight differs between
locations: W_kp = h*w * d(u . v)/dA_kp replaces w_k (its mean over p), so the maps read
ReLU(sum_k |a_k| W_kp A_kp / sum_k |CIS_k|) and sum_k W_kp A_kp. With W_kp = w_k and a >= 0
(post-ReLU features) these are the formulas above; |a_k| keeps the sign of a signed channel's
mean (ViT tokens) from flipping its evidence.

Fast path: when the head is affine (with a pooled LayerNorm's deviation held per image),
J and c are measured once (head.py) and an explanation costs one forward pass per distinct
image and no backward pass. Generic path: any differentiable head, its LayerNorm deviations,
softmax weights and activation gates held (linearise.py); CIS_k = sum_ij A_kij d(u . v)/dA_kij
from one backward of u . v (v detached), which is a_k w_k when the head pools first.
Target layers may output maps, channels-last maps or tokens (layout.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.explain.correspondence import local_embeddings, shared_evidence, top_correspondences
from pipeline.explain.head import AffineHead, has_unit_norm, measure_affine_head, per_image_scale
from pipeline.explain.layers import (
    ExplanationError,
    check_choice,
    embeddings_of,
    find_module,
    hooked_output,
    layer_name,
    parameter_dtype,
)
from pipeline.explain.layout import LAYOUTS, FeatureLayout, LayoutName, detect_layout
from pipeline.explain.linearise import Linearised
from pipeline.explain.metrics import METRICS, Metric, offset, partner_vector, similarity
from pipeline.explain.targets import default_target_layer, influences, modules_giving, suggest_embedding_layer

Weighting = Literal["cis", "partner", "matched"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
Replace = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


def _start_graph(output: torch.Tensor) -> torch.Tensor:
    """The target layer's output as the leaf of the autograd graph: the layers before it ran
    without one (no activations kept for gradients nobody asks for), the head runs with one.
    The caller's torch.no_grad() restores its mode when the forward is done."""
    torch.set_grad_enabled(True)
    return output.detach().requires_grad_()


@dataclass(frozen=True)
class SFAMResult:
    """Explanations of P pairs (query x, reference y). Tensors are float32 on the input device."""

    similarity: torch.Tensor  # (P,)
    cis_query: torch.Tensor  # (P, K) CIS of x given y
    cis_reference: torch.Tensor  # (P, K) CIS of y given x
    map_query: torch.Tensor  # (P, h, w) at feature resolution; >= 0 for "cis" and "matched", signed for "partner"
    map_reference: torch.Tensor  # (P, h, w)
    residual_query: torch.Tensor  # (P,) s - sum(cis_query): exact zero-order term for affine heads
    residual_reference: torch.Tensor  # (P,)
    # (P, k, 5) for "matched", else None: the pair's k strongest matches, strongest first, as rows
    # (x_query, y_query, x_reference, y_reference, cosine of the local embeddings); points are cell
    # centres in feature-grid units (col + 0.5, row + 0.5): multiply by image size / (w, h) for pixels;
    # a row of NaN where the pair has fewer than k matches (none where no cosine is above 0)
    correspondences: torch.Tensor | None = None

    def top_channels(self, k: int) -> torch.Tensor:
        """(P, k) the pair's channels by shared evidence: largest CIS_query + CIS_reference first."""
        shared = self.cis_query + self.cis_reference
        return shared.topk(min(k, shared.shape[1]), dim=1).indices


@dataclass(frozen=True)
class _Attribution:
    """One side of P pairs: what the channels of one image contribute given its partner."""

    similarity: torch.Tensor  # (P,) float64
    weights: torch.Tensor  # (P, K, h, w) float64, W = h*w * d(u . v)/dA; (P, K, 1, 1): w, the same at every location
    cis: torch.Tensor  # (P, K) float64
    residual: torch.Tensor  # (P,) float64


@dataclass(frozen=True)
class _Forward:
    """One forward pass, the head linearised (linearise.py)."""

    output: torch.Tensor  # the target layer's output as the model passed it on, in its own layout
    maps: torch.Tensor  # (N, K, h, w) its patch grid
    embeddings: torch.Tensor  # (N, D)
    scale: torch.Tensor | None  # (N,) float64 1 / sigma of the head's LayerNorm (ones without); None: several


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()


@contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (running statistics, no dropout) for the block, each module's own
    mode restored after: an explainer called during training leaves the training as it was.

    One block at a time per model, across threads and explainers: the explanation hooks the
    model's modules and sets their modes, which another thread's forward would see."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.setdefault(model, threading.RLock())
    with lock:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """The parameters without gradients for the block, as they were after: the graph then starts at
    the target features only (linearise.py's uniform rule tells their products by requires_grad)."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trained:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trained:
            parameter.requires_grad_(True)


def _own_prefix_tokens(model: nn.Module) -> int | None:
    """timm's count of class / register tokens (`num_prefix_tokens`), of the model or of the ViT
    it wraps; None where no module has one, or where they disagree."""
    counts = {module.num_prefix_tokens for module in model.modules()
              if isinstance(getattr(module, "num_prefix_tokens", None), int)}
    return counts.pop() if len(counts) == 1 else None


class SFAM:
    """Explains why `model` finds images similar.

    Args:
        model: maps images (B, 3, H, W) to embeddings (B, D). Explained in eval mode; each
            module's own mode is restored after every call.
        target_layer: the module of the features to explain, or its name in `model.named_modules()`; by default the
            last module whose feature grid influences the embedding; for class-token ViTs the
            tokens entering the first block (targets.py). Chosen at the first explanation; read it back here.
        metric: "cosine", "dot" or "euclidean" on the embeddings.
        embedding_layer: the module (or its name) whose output is the unnormalised embedding, for
            models that L2-normalise inside `forward()`; by default the model's output.
        weighting: "cis" for SFAM maps, "partner" for the signed decomposition map, "matched" for
            the shared-evidence map and point-to-point correspondences (correspondence.py).
        fast_path: use the backward-free path when the head is affine (the default); False
            always takes the generic path, for comparisons.
        feature_layout: "auto" (detected), "nchw", "nhwc" or "tokens": how the target layer's
            output holds its grid (layout.py).
        prefix_tokens: for token outputs, the number of class / register tokens before the
            patch grid; by default the model's `num_prefix_tokens` or what fits the input size.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | nn.Module | None = None,
        metric: Metric = "cosine",
        *,
        embedding_layer: str | nn.Module | None = None,
        weighting: Weighting = "cis",
        fast_path: bool = True,
        feature_layout: LayoutName = "auto",
        prefix_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.metric = check_choice("metric", metric, METRICS)
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.target_layer = layer_name(model, target_layer) if target_layer is not None else None
        self.embedding_layer = layer_name(model, embedding_layer, "embedding_layer") if embedding_layer is not None else None
        own_prefix = _own_prefix_tokens(model)
        if prefix_tokens is not None and own_prefix is not None and prefix_tokens != own_prefix:
            raise ExplanationError(f"prefix_tokens={prefix_tokens} contradicts the model's own num_prefix_tokens="
                                   f"{own_prefix}: leave prefix_tokens unset for this model")
        self._layout_settings = {"layout": check_choice("feature_layout", feature_layout, LAYOUTS), "prefix_tokens": prefix_tokens,
                                 "prefix_hint": own_prefix}
        self._target = find_module(model, self.target_layer) if self.target_layer is not None else None
        self._embedding = (
            find_module(model, self.embedding_layer, "embedding_layer") if self.embedding_layer is not None else None
        )
        self._fast_path = fast_path
        self._layout: FeatureLayout | None = None
        self._layout_input_hw: tuple[int, int] | None = None  # the input size the layout and the head were read at
        self._head: AffineHead | None = None
        self._head_measured = not fast_path  # a head never measured stays None: generic path
        self._told_cost_of_matching = False

    @property
    def is_affine(self) -> bool | None:
        """Whether the fast path applies; None until the first explanation measured the head."""
        return (self._head is not None) if self._head_measured else None

    @property
    def layout(self) -> FeatureLayout | None:
        """The target layer's feature layout; None until the first explanation."""
        return self._layout

    def explain(self, x: torch.Tensor, y: torch.Tensor) -> SFAMResult:
        """Explains the pairs (x[i], y[i]); x, y: (B, 3, H, W) normalised float images."""
        if x.dim() != 4:
            raise ExplanationError(f"x and y must be batches (B, 3, H, W), got {tuple(x.shape)}: add a batch "
                                   "dimension to one image with x[None]")
        if x.shape != y.shape:
            raise ExplanationError(f"query and reference batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        index = torch.arange(x.shape[0], device=x.device)
        return self.explain_pairs(torch.cat([x, y]), index, index + x.shape[0])

    def explain_pairs(
        self, images: torch.Tensor, query_index: torch.Tensor, reference_index: torch.Tensor
    ) -> SFAMResult:
        """Explains pairs of distinct images, each forwarded once.

        images: (N, 3, H, W); query_index, reference_index: (P,) positions in `images`.
        """
        if images.dim() != 4 or not images.is_floating_point():
            raise ExplanationError(f"images must be a float tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if query_index.shape != reference_index.shape or query_index.dim() != 1:
            raise ExplanationError("query_index and reference_index must be 1-D and of equal length")
        if images.shape[0] == 0 or query_index.numel() == 0:
            raise ExplanationError("no pairs to explain: the batches are empty")
        if not bool(torch.isfinite(images.sum(dtype=torch.float32))):  # NaN and inf carry through a sum; 30x isfinite's speed
            raise ExplanationError("images hold NaN or infinite values: nothing about them can be explained")
        with _in_eval_mode(self.model):
            return self._explain_pairs(images.to(parameter_dtype(self.model)), query_index, reference_index)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target layer's maps A (N, K, h, w) and the embeddings u (N, D) of `images`, without
        gradients (inference mode)."""
        images = images.to(parameter_dtype(self.model))
        with _in_eval_mode(self.model):
            self._resolve_target(images[:1])
            with torch.inference_mode():
                forward = self._forward(images)
        return forward.maps, forward.embeddings

    # -- forward passes -------------------------------------------------------------------

    def _explain_pairs(
        self, images: torch.Tensor, query_index: torch.Tensor, reference_index: torch.Tensor
    ) -> SFAMResult:
        self._resolve_target(images[:1])
        if not self._head_measured or self._head is not None:
            with torch.inference_mode():
                forward = self._forward(images)
                self._check_not_scale_invariant(images[:1], forward.embeddings.double())
                head = self._measure_head(images[:1], forward)
                # checked on every batch: a head that is affine only piecewise takes the generic path where it is not
                if head is not None and forward.scale is not None and head.explains(forward.maps, forward.embeddings,
                                                                                    forward.scale):
                    return self._explain_affine(head, forward, query_index, reference_index)
        return self._explain_generic(images, query_index, reference_index)

    def _resolve_target(self, sample: torch.Tensor) -> None:
        """Chooses the target layer (when not given) and its layout, on the first images seen; reads
        the layout and the head again for images of another size (a ViT's grid follows the input)."""
        input_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self._layout is not None and input_hw == self._layout_input_hw:
            return
        self._layout, self._head, self._head_measured = None, None, not self._fast_path
        settings = self._layout_settings
        given = self._target is not None
        embed_with = functools.partial(self._embed_with, sample=sample)  # (module, replace) -> embedding
        if not given:
            self.target_layer = default_target_layer(self.model, sample, embed_with, **settings)
            self._target = find_module(self.model, self.target_layer)
        with torch.inference_mode(), hooked_output(self._target) as seen:
            self._embed(sample)
        if not seen:
            raise ExplanationError(f"target_layer={self.target_layer!r} did not run in the forward pass")
        if len(seen) > 1:  # its gradient would be its last use's only: the others' share would land in the residual
            raise ExplanationError(f"target_layer={self.target_layer!r} runs {len(seen)} times per forward pass (its "
                                   "weights are shared); name a layer that runs once")
        try:
            layout = detect_layout(seen[-1].shape, tuple(sample.shape[-2:]), **settings)
        except ExplanationError as error:  # named: the layer may be the default or the one given
            raise ExplanationError(f"target_layer={self.target_layer!r}: {error}") from error
        if given and not influences(lambda replace: embed_with(self._target, replace), layout):
            try:
                better = f"use target_layer={default_target_layer(self.model, sample, embed_with, **settings)!r}"
            except ExplanationError:  # no layer has any: a constant embedding (weights of zeros, a zero-initialised head)
                better = "no layer of the model has any; is the embedding constant (weights not loaded, or zeros)?"
            why = " (with class-token pooling, the last block's patch tokens never reach it)" if layout.kind == "tokens" else ""
            raise ExplanationError(f"target_layer={self.target_layer!r} has no influence on the embedding{why}: {better}")
        self._layout, self._layout_input_hw = layout, input_hw

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D): the model's output, or embedding_layer's output."""
        embeddings = embeddings_of(self.model, self._embedding, images)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            if self.embedding_layer is not None:
                raise ExplanationError(f"embedding_layer={self.embedding_layer!r} outputs {shape}, not a (B, D) "
                                       "embedding: name the module that outputs the pooled embedding")
            giving = ", ".join(f"{name!r} outputs its {item}" for name, item in modules_giving(self.model, images, embeddings))
            raise ExplanationError(
                f"the model's output is {shape}, not a (B, D) embedding tensor; pass embedding_layer= to name the "
                + (f"module that outputs the embedding: {giving}" if giving else
                   "module that outputs it, or give a factory whose model returns it (flattened, as (B, D))")
            )
        return embeddings

    def _embed_with(self, module: nn.Module, replace: Replace | None, sample: torch.Tensor) -> torch.Tensor:
        """The embedding of `sample` with `module`'s output passed through `replace`."""
        with torch.inference_mode(), hooked_output(module, replace):
            return self._embed(sample)

    def _forward(self, images: torch.Tensor, replace: Replace | None = None, unit_statistics: bool = False) -> _Forward:
        """One forward, the head linearised; `replace` may substitute the target layer's output
        downstream; `unit_statistics` sets the head's LayerNorm deviations to 1 (probing)."""
        mode = Linearised(unit_statistics)

        def enter_head(output: torch.Tensor) -> torch.Tensor:
            mode.active = True
            return replace(output) if replace is not None else output

        with mode, hooked_output(self._target, enter_head) as seen:
            embeddings = self._embed(images)
        if not seen:
            raise ExplanationError(f"target_layer={self.target_layer!r} did not run in the forward pass")
        output = seen[-1]
        return _Forward(output, self._layout.to_maps(output), embeddings, per_image_scale(mode.deviations, embeddings))

    def _measure_head(self, sample: torch.Tensor, forward: _Forward) -> AffineHead | None:
        if not self._head_measured:
            if forward.scale is not None:
                self._head = measure_affine_head(
                    lambda probe: self._forward(
                        sample, replace=lambda output: self._layout.from_maps(probe, output), unit_statistics=True
                    ).embeddings,
                    forward.maps, forward.embeddings, forward.scale,
                )
            self._head_measured = True
        return None if self._head is None else self._head.to(forward.maps.device)

    # -- the two paths --------------------------------------------------------------------

    def _explain_affine(
        self, head: AffineHead, forward: _Forward, query_index: torch.Tensor, reference_index: torch.Tensor
    ) -> SFAMResult:
        pooled = forward.maps.double().mean(dim=(2, 3))  # (N, K)
        u = forward.embeddings.double()

        def attribute(x: torch.Tensor, y: torch.Tensor) -> _Attribution:
            v = partner_vector(self.metric, u[x], u[y])  # (P, D)
            weights = (v @ head.jacobian) * forward.scale[x, None]  # (P, K)
            cis = pooled[x] * weights
            weights = weights[:, :, None, None]  # the head pools first: one weight per channel
            residual = (v * head.bias).sum(dim=1) + offset(self.metric, u[y])
            return _Attribution(similarity(self.metric, u[x], u[y]), weights, cis, residual)

        local = local_embeddings(forward.maps, head.jacobian, forward.scale) if self.weighting == "matched" else None
        return self._result(forward.maps, local, query_index, reference_index, attribute(query_index, reference_index),
                            attribute(reference_index, query_index))

    def _explain_generic(
        self, images: torch.Tensor, query_index: torch.Tensor, reference_index: torch.Tensor
    ) -> SFAMResult:
        """Any differentiable head: gradient x activation of u . v (v detached), head linearised.

        Each distinct image is forwarded once; an image that is in several pairs gets one
        backward per partner (rounds of slots whose images are all different).
        """
        pairs = query_index.shape[0]
        slots = torch.cat([query_index, reference_index])  # (2P,) query sides, then reference sides
        partners = torch.cat([reference_index, query_index])
        rounds = (slots[:, None] == slots[None, :]).tril(-1).sum(dim=1)  # (2P,) earlier slots, same image
        # "matched" differentiates twice: fused attention kernels have no second derivative, the math one does
        attention = sdpa_kernel(SDPBackend.MATH) if self.weighting == "matched" else nullcontext()
        with torch.inference_mode(False), torch.no_grad(), attention, _frozen_parameters(self.model):
            forward = self._forward(images.clone(), replace=_start_graph)
            u = forward.embeddings  # (N, D)
            local = self._local_embeddings(forward) if self.weighting == "matched" else None
            u64 = u.detach().double()
            v64 = partner_vector(self.metric, u64[slots], u64[partners])  # (2P, D) float64, as the similarity
            v = v64.to(u.dtype)  # the backward's seed
            gradients = torch.empty((2 * pairs, *forward.output.shape[1:]), dtype=forward.output.dtype,
                                    device=forward.output.device)
            last = int(rounds.max())
            for index in range(last + 1):
                chosen = rounds == index
                seed = torch.zeros_like(u)
                seed[slots[chosen]] = v[chosen]
                gradient = self._gradient(u, forward.output, seed, retain_graph=index < last)
                gradients[chosen] = gradient[slots[chosen]]
        features = forward.maps.detach()[slots]  # (2P, K, h, w)
        dsim = self._layout.to_maps(gradients).double()  # (2P, K, h, w): d(u . v)/dA
        weights = dsim * self._layout.grid  # (2P, K, h, w): W, = w at every location when the head pools first
        cis = (features.double() * dsim).sum(dim=(2, 3))  # = a * w when the head pools first
        s = similarity(self.metric, u64[query_index], u64[reference_index])
        linear = (u64[slots] * v64).sum(dim=1)  # (2P,) u . v, what the CIS sum to
        residual = linear - cis.sum(dim=1) + offset(self.metric, u64[partners])
        self._check_not_scale_invariant(images[:1], u64, cis[:pairs], linear[:pairs])
        sides = [_Attribution(s, weights[half], cis[half], residual[half]) for half in (slice(0, pairs), slice(pairs, None))]
        index = torch.arange(2 * pairs, device=features.device)
        return self._result(features, None if local is None else local[slots], index[:pairs], index[pairs:], *sides)

    def _ignores_scale(self, sample: torch.Tensor, u: torch.Tensor) -> bool:
        """Whether the embedding (1, D) of `sample` stays as it was when the target layer's features
        are doubled: an output normalised to a fixed norm, however the normalisation is written."""
        with torch.no_grad():
            doubled = self._forward(sample, replace=lambda output: 2 * output).embeddings.double()
        return bool((doubled - u).norm() <= 1e-3 * u.norm())

    def _gradient(self, embeddings: torch.Tensor, output: torch.Tensor, seed: torch.Tensor, **options: bool) -> torch.Tensor:
        """d(embeddings . seed)/d(output) through the linearised head; an output that reaches the
        embeddings only through what the head holds is named."""
        # without a path, the embedding has no graph at all when the model's parameters are frozen
        gradient = (torch.autograd.grad(embeddings, output, seed, allow_unused=True, **options)[0]
                    if embeddings.requires_grad else None)
        if gradient is None:
            raise ExplanationError(
                f"target_layer={self.target_layer!r} reaches the embedding only through what is held while "
                "attributing (attention queries and keys, normalisation statistics, gates), so nothing flows back to "
                "its channels: name a layer whose features reach the embedding as values, e.g. the input of the "
                "attention or pooling"
            )
        return gradient

    def _local_embeddings(self, forward: _Forward) -> torch.Tensor:
        """e(p) = h*w * sum_k A_kp du/dA_kp of each image, (N, h*w, D) float32: J A(:, p) when the head
        pools first. Differentiates twice: g(s) = (du/dA)^T s is linear in s, so the gradient of
        g . T with respect to s is (du/dA) T, one pass per location p with T = A masked to p."""
        if not self._told_cost_of_matching:
            log.warning("weighting='matched' on a head that does not pool first (the generic path) takes one more pass "
                        "through the head per grid location, %d per image: up to that many times the time of "
                        "weighting='cis' (docs/method.md, Shared evidence)", self._layout.grid)
            self._told_cost_of_matching = True
        maps = forward.maps.detach()  # (N, K, h, w)
        seed = torch.zeros_like(forward.embeddings, requires_grad=True)  # (N, D)
        transposed = self._gradient(forward.embeddings, forward.output, seed, create_graph=True)
        blank = torch.zeros_like(forward.output)
        masks = torch.eye(self._layout.grid, dtype=maps.dtype, device=maps.device).view(-1, 1, 1, *maps.shape[2:])
        local = [
            torch.autograd.grad(transposed, seed, self._layout.from_maps(maps * mask, blank), retain_graph=True)[0]
            for mask in masks
        ]
        return torch.stack(local, dim=1).float() * self._layout.grid  # (N, h*w, D)

    # -- shared ---------------------------------------------------------------------------

    def _check_not_scale_invariant(self, sample: torch.Tensor, u: torch.Tensor, cis: torch.Tensor | None = None,
                                   linear: torch.Tensor | None = None) -> None:
        """Refuses to explain an L2-normalised output, whose attributions sum to about zero: an
        output of unit norm, or (the generic path's `cis` (P, K) of the pairs' query sides, with
        `linear` (P,) the u . v that they should sum to) contributions that cancel where u . v does
        not, in an output that doubling the target layer's features leaves as it was (within 1e-3).
        A pair whose u . v is itself about zero (a near-orthogonal negative) says nothing either way;
        the doubling keeps a model whose contributions cancel by chance (a Tanh head) from being
        refused. A model that is nearly scale invariant at the layer (a random CLIP at `pos_drop`:
        doubling moves its embedding by about 1e-6) can still be refused for a lone pair whose
        contributions cancel by chance. Both paths check it, whatever the normalisation is written with.

        A LayerNorm at the end is not such a case: its deviation is held (linearise.py).
        """
        if self._embedding is not None:
            return
        unit_norm = has_unit_norm(u, parameter_dtype(self.model))
        # a scale-invariant output cancels its contributions down to rounding (at most 1.1e-5 of
        # their total magnitude in float32, 150 random models); other models' single pairs did
        # not cancel below 2.6e-3 of it (150 random pairs on a random tanh head)
        no_completeness = False
        if cis is not None and linear is not None:
            total, magnitude = cis.sum(dim=1), cis.abs().sum(dim=1)
            telling = (linear.abs() > 1e-2 * magnitude) & (magnitude > 0)
            cancel = bool(telling.any() and (total[telling].abs() <= 1e-4 * magnitude[telling]).all())
            no_completeness = cancel and self._ignores_scale(sample, u[:1])
        if unit_norm or no_completeness:
            layer = suggest_embedding_layer(self.model, sample, self.target_layer)
            hint = f" (probably embedding_layer={layer!r})" if layer else ""
            raise ExplanationError(
                "the model's output is scale invariant (it looks L2-normalised inside forward()), so "
                "channel contributions sum to about zero and the maps would be empty. Set embedding_layer "
                "(model.embedding_layer in a config, --embedding-layer of `sfam explain`) to the module after the "
                f"target layer that outputs the unnormalised (B, D) embedding{hint}."
            )

    def _result(
        self,
        features: torch.Tensor,
        local: torch.Tensor | None,
        query_index: torch.Tensor,
        reference_index: torch.Tensor,
        query: _Attribution,
        reference: _Attribution,
    ) -> SFAMResult:
        """features (N, K, h, w) and, for "matched", local embeddings (N, h*w, D), indexed by the pairs."""
        if local is None:
            maps = self._map(features[query_index], query), self._map(features[reference_index], reference)
            correspondences = None
        else:
            e_x, e_y = local[query_index], local[reference_index]  # (P, h*w, D)
            evidence = shared_evidence(e_x, e_y)
            maps = tuple(m.view(-1, *features.shape[2:]) for m in (evidence.map_x, evidence.map_y))
            correspondences = top_correspondences(evidence.matches, evidence.terms, width=features.shape[3])
        return SFAMResult(
            similarity=query.similarity.float(),
            cis_query=query.cis.float(),
            cis_reference=reference.cis.float(),
            map_query=maps[0],
            map_reference=maps[1],
            residual_query=query.residual.float(),
            residual_reference=reference.residual.float(),
            correspondences=correspondences,
        )

    def _map(self, features: torch.Tensor, side: _Attribution) -> torch.Tensor:
        """(P, K, h, w) features and the pairs' channel weights W -> (P, h, w) float32 maps."""
        features = features.float()
        if self.weighting == "partner":
            return (side.weights.float() * features).sum(dim=1)  # sum_k W_kp A_kp
        emphasis = features.mean(dim=(2, 3), keepdim=True).abs()  # (P, K, 1, 1) |a|
        scale = side.cis.abs().sum(dim=1).clamp_min(1e-30).float()[:, None, None]
        return ((emphasis * side.weights.float() * features).sum(dim=1) / scale).relu()  # CIS_k A_kp when W = w, a >= 0
