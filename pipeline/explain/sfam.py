"""SFAM: channel-wise contribution importance scores (CIS) and Similar Feature Activation Maps.

The formulas are this project's derivation from the abstracts of Liao et al., "Visual
Explanation via Similar Feature Activation for Metric Learning" (arXiv 2506.01636) and
its predecessor FAM (arXiv 2307.05017); see DESIGN.md section 1. For an image x with
target-layer features A^x (K, h, w), pooled features a^x = GAP(A^x) and embedding
u^x = J^x a^x + c^x, given its partner y:

    w^{x|y}   = J^x^T v^{x|y}          v: the metric's partner vector (metrics.py)
    CIS^{x|y} = a^x * w^{x|y}          sum_k CIS_k + residual = s(x, y)
    SFAM^x    = ReLU(sum_k CIS_k / sum_k |CIS_k| * A^x_k)      weighting="cis"
    map^x     = sum_k w_k A^x_k                                 weighting="partner"

Fast path: when the head is affine, J and c are measured once (head.py) and an explanation
costs one forward pass per distinct image and no backward pass. Generic path: any
differentiable head; one batched backward of sum_pairs u^x . v (v detached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.explain.head import AffineHead, measure_affine_head
from pipeline.explain.layers import ExplanationError, default_target_layer, find_module, hooked_output
from pipeline.explain.metrics import Metric, check_metric, offset, partner_vector, similarity

Weighting = Literal["cis", "partner"]


@dataclass(frozen=True)
class SFAMResult:
    """Explanations of P pairs (query x, reference y). Tensors are float32 on the input device."""

    similarity: torch.Tensor  # (P,)
    cis_query: torch.Tensor  # (P, K) CIS of x given y
    cis_reference: torch.Tensor  # (P, K) CIS of y given x
    map_query: torch.Tensor  # (P, h, w) at feature resolution; >= 0 for "cis", signed for "partner"
    map_reference: torch.Tensor  # (P, h, w)
    residual_query: torch.Tensor  # (P,) s - sum(cis_query): exact zero-order term for affine heads
    residual_reference: torch.Tensor  # (P,)

    def top_channels(self, k: int) -> torch.Tensor:
        """(P, k) the pair's channels by shared evidence: largest CIS_query + CIS_reference first."""
        return torch.argsort(self.cis_query + self.cis_reference, dim=1, descending=True)[:, :k]


@dataclass(frozen=True)
class _Attribution:
    """One side of P pairs: what the channels of one image contribute given its partner."""

    similarity: torch.Tensor  # (P,) float64
    weights: torch.Tensor  # (P, K) float64, w
    cis: torch.Tensor  # (P, K) float64
    residual: torch.Tensor  # (P,) float64


class SFAM:
    """Explains why `model` finds images similar.

    Args:
        model: maps images (B, 3, H, W) to embeddings (B, D). Put in eval mode.
        target_layer: name in `model.named_modules()` of the feature map to explain; by default
            the last module that outputs a spatial map.
        metric: "cosine", "dot" or "euclidean" on the embeddings.
        embedding_layer: name of the module whose output is the unnormalised embedding, for
            models that L2-normalise inside `forward()`; by default the model's output.
        weighting: "cis" for SFAM maps, "partner" for the signed decomposition map.
        fast_path: use the backward-free path when the head is affine (the default); False
            always takes the generic path, for comparisons.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        metric: Metric = "cosine",
        *,
        embedding_layer: str | None = None,
        weighting: Weighting = "cis",
        fast_path: bool = True,
    ) -> None:
        if weighting not in ("cis", "partner"):
            raise ValueError(f"weighting={weighting!r} is not 'cis' or 'partner'")
        self.model = model.eval()
        self.metric = check_metric(metric)
        self.weighting = weighting
        self.target_layer = target_layer
        self.embedding_layer = embedding_layer
        self._target = find_module(model, target_layer) if target_layer is not None else None
        self._embedding = (
            find_module(model, embedding_layer, "embedding_layer") if embedding_layer is not None else None
        )
        self._head: AffineHead | None = None
        self._head_measured = not fast_path  # a head never measured stays None: generic path

    @property
    def is_affine(self) -> bool | None:
        """Whether the fast path applies; None until the first explanation measured the head."""
        return (self._head is not None) if self._head_measured else None

    def explain(self, x: torch.Tensor, y: torch.Tensor) -> SFAMResult:
        """Explains the pairs (x[i], y[i]); x, y: (B, 3, H, W) normalised float images."""
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
        images = images.to(self._parameter_dtype())
        self._resolve_target(images[:1])
        if not self._head_measured or self._head is not None:
            with torch.inference_mode():
                features, embeddings = self._forward(images)
                head = self._measure_head(images[:1], features, embeddings)
                if head is not None:
                    return self._explain_affine(head, features, embeddings, query_index, reference_index)
        return self._explain_generic(images, query_index, reference_index)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target layer's maps A (N, K, h, w) and the embeddings u (N, D) of `images`."""
        self._resolve_target(images[:1])
        return self._forward(images)

    # -- forward passes -------------------------------------------------------------------

    def _parameter_dtype(self) -> torch.dtype:
        """Inputs are cast to the model's floating dtype (float16 images into a float32 model)."""
        parameter = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return parameter.dtype if parameter is not None else torch.float32

    def _resolve_target(self, sample: torch.Tensor) -> None:
        if self._target is None:
            self.target_layer = default_target_layer(self.model, sample)
            self._target = find_module(self.model, self.target_layer)

    def _forward(
        self, images: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward; `replace` may substitute the target layer's output downstream."""
        with hooked_output(self._target, replace) as features:
            if self._embedding is None:
                embeddings = self.model(images)
            else:
                with hooked_output(self._embedding) as seen:
                    self.model(images)
                embeddings = seen[-1]
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ExplanationError(
                "the model's output is not a (B, D) embedding tensor; pass embedding_layer= "
                "to name the module that outputs it"
            )
        if not features:
            raise ExplanationError(f"target_layer={self.target_layer!r} did not run in the forward pass")
        return features[-1], embeddings

    def _measure_head(
        self, sample: torch.Tensor, features: torch.Tensor, embeddings: torch.Tensor
    ) -> AffineHead | None:
        if not self._head_measured:
            self._head = measure_affine_head(
                lambda probe: self._forward(sample, replace=lambda _output: probe)[1], features, embeddings
            )
            self._head_measured = True
        return None if self._head is None else self._head.to(features.device)

    # -- the two paths --------------------------------------------------------------------

    def _explain_affine(
        self,
        head: AffineHead,
        features: torch.Tensor,
        embeddings: torch.Tensor,
        query_index: torch.Tensor,
        reference_index: torch.Tensor,
    ) -> SFAMResult:
        pooled = features.double().mean(dim=(2, 3))  # (N, K)
        u = embeddings.double()

        def attribute(x: torch.Tensor, y: torch.Tensor) -> _Attribution:
            v = partner_vector(self.metric, u[x], u[y])  # (P, D)
            weights = v @ head.jacobian  # (P, K)
            cis = pooled[x] * weights
            residual = (v * head.bias).sum(dim=1) + offset(self.metric, u[y])
            return _Attribution(similarity(self.metric, u[x], u[y]), weights, cis, residual)

        return self._result(features, query_index, reference_index, attribute(query_index, reference_index),
                            attribute(reference_index, query_index))

    def _explain_generic(
        self, images: torch.Tensor, query_index: torch.Tensor, reference_index: torch.Tensor
    ) -> SFAMResult:
        """Any differentiable head: w from one backward of sum_slots u . v, v detached."""
        pairs = query_index.shape[0]
        slots = torch.cat([query_index, reference_index])  # (2P,) query sides, then reference sides
        with torch.inference_mode(False), torch.enable_grad():
            features_per_slot, u = self._forward(  # (2P, K, h, w) leaf, (2P, D)
                images.clone(), replace=lambda output: output.detach()[slots].requires_grad_()
            )
            partner = torch.cat([u[pairs:], u[:pairs]]).detach()
            v = partner_vector(self.metric, u.detach(), partner)
            (gradient,) = torch.autograd.grad((u * v).sum(), features_per_slot)
        weights = gradient.double().sum(dim=(2, 3))  # (2P, K): h*w * mean_ij d/dA
        pooled = features_per_slot.detach().double().mean(dim=(2, 3))
        cis = pooled * weights
        u64, v64 = u.detach().double(), v.double()
        s = similarity(self.metric, u64[:pairs], u64[pairs:])
        residual = (u64 * v64).sum(dim=1) - cis.sum(dim=1) + offset(self.metric, partner.double())
        self._check_not_scale_invariant(u64, s, cis)
        sides = [_Attribution(s, weights[half], cis[half], residual[half]) for half in (slice(0, pairs), slice(pairs, None))]
        features = features_per_slot.detach()
        index = torch.arange(2 * pairs, device=features.device)
        return self._result(features, index[:pairs], index[pairs:], *sides)

    # -- shared ---------------------------------------------------------------------------

    def _check_not_scale_invariant(self, u: torch.Tensor, s: torch.Tensor, cis: torch.Tensor) -> None:
        """Refuses to explain an L2-normalised output, whose attributions sum to about zero."""
        if self._embedding is not None:
            return
        unit_norm = bool(((u.norm(dim=1) - 1).abs() < 1e-4).all())
        # a scale-invariant output cancels its contributions down to rounding (at most 1.1e-5 of
        # their total magnitude in float32, 150 random models); other models' single pairs did
        # not cancel below 2.6e-3 of it (150 random pairs on a random tanh head)
        pairs = s.shape[0]
        total, magnitude = cis[:pairs].sum(dim=1), cis[:pairs].abs().sum(dim=1)
        no_completeness = bool(((total.abs() <= 1e-4 * magnitude) & (magnitude > 0)).all())
        if unit_norm or no_completeness:
            linear = [name for name, module in self.model.named_modules() if isinstance(module, nn.Linear)]
            hint = f" (probably embedding_layer={linear[-1]!r})" if linear else ""
            raise ExplanationError(
                "the model's output is scale invariant (it looks L2-normalised inside forward()), so "
                "channel contributions sum to about zero and the maps would be empty. Pass "
                f"embedding_layer= naming the module that outputs the unnormalised embedding{hint}."
            )

    def _result(
        self,
        features: torch.Tensor,
        query_index: torch.Tensor,
        reference_index: torch.Tensor,
        query: _Attribution,
        reference: _Attribution,
    ) -> SFAMResult:
        return SFAMResult(
            similarity=query.similarity.float(),
            cis_query=query.cis.float(),
            cis_reference=reference.cis.float(),
            map_query=self._map(features[query_index], query),
            map_reference=self._map(features[reference_index], reference),
            residual_query=query.residual.float(),
            residual_reference=reference.residual.float(),
        )

    def _map(self, features: torch.Tensor, side: _Attribution) -> torch.Tensor:
        """(P, K, h, w) features and per-pair channel weights -> (P, h, w) float32 maps."""
        if self.weighting == "cis":
            weights = side.cis / side.cis.abs().sum(dim=1, keepdim=True).clamp_min(1e-30)
        else:
            weights = side.weights
        maps = torch.einsum("pk,pkhw->phw", weights.float(), features.float())
        return maps.relu() if self.weighting == "cis" else maps
