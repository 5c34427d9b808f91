"""Models with known heads, and a float64 reference of the method (docs/method.md) written independently."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class SmallNet(nn.Module):
    """Conv trunk ("features", K=16) -> GAP -> `head` -> optional L2 normalisation."""

    def __init__(self, head: nn.Module, normalise: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.normalise = normalise

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u = self.head(self.pool(self.features(images)).flatten(1))
        return F.normalize(u, dim=1) if self.normalise else u


def resnet18_embedding(dim: int | None = 32) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, dim) if dim else nn.Identity()
    return model.eval()


def nonaffine_net() -> SmallNet:
    return SmallNet(nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))).eval()


def affine_net() -> SmallNet:
    """Linear -> BatchNorm1d -> Dropout, in eval mode an affine head."""
    head = nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Dropout(0.3))
    net = SmallNet(head)
    with torch.no_grad():  # non-trivial running statistics
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.uniform_(-0.5, 0.5)
    return net.eval()


@dataclass
class Case:
    """A model, the name of its target layer, and its head as a function of pooled features."""

    model: nn.Module
    target_layer: str
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, a (N, K)) -> u (N, D)
    input_size: int = 32


CASES: dict[str, Callable[[], Case]] = {
    "resnet18": lambda: Case(resnet18_embedding(), "layer4", lambda m, a: m.fc(a), 64),
    "affine": lambda: Case(affine_net(), "features", lambda m, a: m.head(a)),
    "nonaffine": lambda: Case(nonaffine_net(), "features", lambda m, a: m.head(a)),
}


@dataclass
class Reference:
    similarity: torch.Tensor
    weights: torch.Tensor  # (P, K), or (P, K, h, w) when a channel's weight differs between locations
    cis: torch.Tensor  # (P, K)
    residual: torch.Tensor  # (P,)
    map_cis: torch.Tensor  # (P, h, w)
    map_partner: torch.Tensor  # (P, h, w)


def double_features(case: Case, *images: torch.Tensor) -> tuple[nn.Module, list[torch.Tensor]]:
    """A float64 copy of the case's model and its target layer's features (P, K, h, w) of each batch."""
    model = copy.deepcopy(case.model).double()
    target = dict(model.named_modules())[case.target_layer]
    features: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: features.append(out))
    with torch.no_grad():
        for batch in images:
            model(batch.double())
    handle.remove()
    return model, features


def reference_explanation(case: Case, x: torch.Tensor, y: torch.Tensor, metric: str) -> Reference:
    """CIS of x given y in float64, with J from autograd's full Jacobian of the head."""
    model, (feat_x, feat_y) = double_features(case, x, y)
    a_x, a_y = feat_x.mean(dim=(2, 3)), feat_y.mean(dim=(2, 3))
    u_x, u_y = case.head(model, a_x), case.head(model, a_y)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda a: case.head(model, a[None])[0], row) for row in a_x]
    )  # (P, D, K)
    bias = u_x - torch.einsum("pdk,pk->pd", jac, a_x)
    if metric == "cosine":
        s = (u_x * u_y).sum(1) / (u_x.norm(dim=1) * u_y.norm(dim=1))
        v = u_y / u_y.norm(dim=1, keepdim=True) / u_x.norm(dim=1, keepdim=True)
        extra = torch.zeros_like(s)
    elif metric == "dot":
        s = (u_x * u_y).sum(1)
        v = u_y
        extra = torch.zeros_like(s)
    else:
        s = -0.5 * ((u_x - u_y) ** 2).sum(1)
        v = u_y - 0.5 * u_x
        extra = -0.5 * (u_y**2).sum(1)
    w = torch.einsum("pdk,pd->pk", jac, v)
    cis = a_x * w
    normalised = cis / cis.abs().sum(1, keepdim=True)
    return Reference(
        similarity=s,
        weights=w,
        cis=cis,
        residual=(bias * v).sum(1) + extra,
        map_cis=torch.einsum("pk,pkhw->phw", normalised, feat_x).clamp_min(0),
        map_partner=torch.einsum("pk,pkhw->phw", w, feat_x),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, what: str = "",
                 scale: float | torch.Tensor = 0.0) -> None:
    """max |actual - expected| <= rel * max(max |expected|, scale); that must not be 0.

    `scale` is for differences of larger numbers: a residual (s - sum of CIS) is as precise as s.
    """
    expected = expected.detach().double().cpu()
    scale = max(float(expected.abs().max()), float(torch.as_tensor(scale).detach()))
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would be empty"
    error = (actual.detach().double().cpu() - expected).abs().max()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x {scale:.3g}"


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, what: str = "") -> None:
    """Maps (P, h, w) after the ReLU: a pair whose contributions are all negative has an all-zero
    map (nothing similar; a random model sometimes gives that for every pair). Those must be zero
    in `actual` too; the other pairs are compared with assert_close."""
    empty = expected.detach().flatten(1).abs().amax(1).cpu() == 0
    assert (actual.detach().cpu()[empty] == 0).all(), f"{what}: non-zero where the reference map is empty"
    if not empty.all():
        assert_close(actual[~empty.to(actual.device)], expected[~empty.to(expected.device)], rel, what)
