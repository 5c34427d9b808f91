"""Shared evidence: correspondences between the local embeddings of a pair's two images.

For an image x with target-layer features A^x (K, h, w) and a head linearised as
u^x = J^x a^x + c^x, the local embedding of location p is e^x(p) = J^x A^x(:, p): what p
would embed to on its own (GAP of e^x is u^x - c^x). For a pair (x, y):

    C[p, q]  = cos(e^x(p), e^y(q))                                      (hw, h'w')
    n^x(p)   = |e^x(p)|                                  local evidence
    M^x(p)   = n^x(p) * sum_q ReLU(C[p, q])^g n^y(q) / sum_q n^y(q)     weighting="matched"

M^x is large where x holds something with a strong counterpart in y, whatever y's other
content is; M^y is the same with the roles swapped. g (SHARPNESS) and the form were chosen
among several candidates on held-out data (jobs/study_shared_evidence.py, docs/method.md).
Everything is batched over pairs; shapes are in the comments. Torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SHARPNESS = 8  # g: matches below cos ~0.7 count little (0.7^8 ~ 0.06)
TOP_MATCHES = 5  # correspondences kept per pair


def local_embeddings(maps: torch.Tensor, jacobian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e(p) = J A(:, p) / sigma: (N, K, h, w) maps, (D, K) J, (N,) 1 / sigma -> (N, h*w, D) float32."""
    features = maps.flatten(2).float()  # (N, K, hw)
    return torch.einsum("dk,nkp->npd", jacobian.float(), features) * scale.float()[:, None, None]


class SharedEvidence(NamedTuple):
    """A batch of pairs' correspondences (P, n, m), pair terms (P, n, m) and matched maps (P, n), (P, m)."""

    matches: torch.Tensor  # C[p, q]
    terms: torch.Tensor  # T[p, q] = n^x(p) ReLU(C[p, q])^g n^y(q)
    map_x: torch.Tensor  # M^x(p) = sum_q T[p, q] / sum_q n^y(q)
    map_y: torch.Tensor  # M^y(q) = sum_p T[p, q] / sum_p n^x(p)


def shared_evidence(e_x: torch.Tensor, e_y: torch.Tensor, sharpness: float = SHARPNESS) -> SharedEvidence:
    """The matched maps of local embeddings e^x (P, n, D), e^y (P, m, D), and what they are read from;
    a zero embedding matches nothing."""
    n_x, n_y = e_x.norm(dim=2), e_y.norm(dim=2)  # (P, n), (P, m)
    tiny = torch.finfo(e_x.dtype).tiny
    matches = (e_x / n_x[:, :, None].clamp_min(tiny)) @ (e_y / n_y[:, :, None].clamp_min(tiny)).transpose(1, 2)
    terms = n_x[:, :, None] * matches.relu().pow(sharpness) * n_y[:, None, :]
    total_x = n_x.sum(dim=1, keepdim=True).clamp_min(1e-30)  # (P, 1)
    total_y = n_y.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return SharedEvidence(matches, terms, terms.sum(dim=2) / total_y, terms.sum(dim=1) / total_x)


def top_correspondences(matches: torch.Tensor, terms: torch.Tensor, width: int, k: int = TOP_MATCHES) -> torch.Tensor:
    """The k strongest matches of each pair: (P, k, 5) rows (x_q, y_q, x_r, y_r, cos).

    Each location p of x is paired with the q of y whose pair term T[p, q] (shared_evidence) is
    largest; the k locations of x with the largest such terms are kept, strongest first. Points
    are cell centres in feature-grid units ((col + 0.5, row + 0.5) of grids `width` cells wide);
    multiply by image size / grid size for pixels. A match whose term is not positive (no cosine
    above 0, or no evidence) is no match: its row is NaN. matches: C (P, n, m); terms: T (P, n, m).
    """
    best, partner = terms.max(dim=2)  # (P, n)
    strength, chosen = best.topk(min(k, best.shape[1]), dim=1)  # (P, k) terms and locations of x
    q = partner.gather(1, chosen)  # (P, k) locations of y
    rows = matches.gather(1, chosen[:, :, None].expand(-1, -1, matches.shape[2]))  # (P, k, m)
    cos = rows.gather(2, q[:, :, None])[:, :, 0].clamp(-1, 1)  # (P, k); float32 rounding reached 1.0000002
    found = torch.stack([chosen % width + 0.5, chosen // width + 0.5, q % width + 0.5, q // width + 0.5, cos], dim=2).float()
    return found.masked_fill((strength <= 0)[:, :, None], float("nan"))
