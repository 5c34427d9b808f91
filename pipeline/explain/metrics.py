"""Similarity metrics, each split into a part linear in the query embedding and a constant.

For a metric s(x, y) = u^x . v^{x|y} + offset^{x|y} (docs/method.md), where the partner
vector v is treated as a constant when the similarity is attributed to the query's channels.
All functions take embeddings of shape (P, D) and return (P, D) or (P,).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

Metric = Literal["cosine", "dot", "euclidean"]
METRICS: tuple[str, ...] = get_args(Metric)


def similarity(metric: Metric, u_x: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """s(x, y) for each row: (P, D), (P, D) -> (P,)."""
    if metric == "cosine":
        return (unit(u_x) * unit(u_y)).sum(dim=1)
    if metric == "dot":
        return (u_x * u_y).sum(dim=1)
    return -0.5 * (u_x - u_y).pow(2).sum(dim=1)


def partner_vector(metric: Metric, u_x: torch.Tensor, u_y: torch.Tensor) -> torch.Tensor:
    """v^{x|y}, the vector whose dot product with u^x is the linear part of s(x, y)."""
    if metric == "cosine":
        return unit(u_y) / u_x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u_x.dtype).tiny)
    if metric == "dot":
        return u_y
    return u_y - 0.5 * u_x


def offset(metric: Metric, u_y: torch.Tensor) -> torch.Tensor:
    """The part of s(x, y) that does not go through u^x . v: -1/2 |u^y|^2 for euclidean, else 0."""
    if metric == "euclidean":
        return -0.5 * u_y.pow(2).sum(dim=1)
    return u_y.new_zeros(u_y.shape[0])


def unit(u: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """u over its norm along `dim`; zero vectors stay zero. No absolute floor on the norm (such as
    cosine_similarity's eps), which would scale down the cosine of embeddings whose norm is below it
    (untrained weights reach 1e-12)."""
    return F.normalize(u, dim=dim, eps=torch.finfo(u.dtype).tiny)
