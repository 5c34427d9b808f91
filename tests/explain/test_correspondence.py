"""weighting="matched": shared-evidence maps and correspondences against a float64 reference."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from pipeline import SFAM
from pipeline.explain.correspondence import SHARPNESS, TOP_MATCHES, shared_evidence, top_correspondences
from pipeline.explain.layers import ExplanationError
from pipeline.render.result_row import matches_in_pixels

from reference import CASES, Case, assert_close, assert_maps_close, double_features


def reference_matched(case: Case, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """M^x, M^y (P, h, w), C (P, hw, hw) and the pair terms n^x(p) ReLU(C[p, q])^g n^y(q) (P, hw, hw) in
    float64, each image's J from autograd's Jacobian at its own a."""
    model, features = double_features(case, x, y)
    local = []
    for feats in features:  # (P, K, h, w)
        jac = torch.stack([torch.autograd.functional.jacobian(lambda a: case.head(model, a[None])[0], row)
                           for row in feats.mean(dim=(2, 3))])  # (P, D, K)
        local.append(torch.einsum("pdk,pkhw->phwd", jac, feats).flatten(1, 2))  # (P, hw, D)
    e_x, e_y = local
    matches = F.normalize(e_x, dim=2) @ F.normalize(e_y, dim=2).transpose(1, 2)
    n_x, n_y = e_x.norm(dim=2), e_y.norm(dim=2)
    m_x = n_x * (matches.clamp_min(0) ** SHARPNESS @ n_y[..., None])[..., 0] / n_y.sum(1, keepdim=True)
    m_y = n_y * (matches.transpose(1, 2).clamp_min(0) ** SHARPNESS @ n_x[..., None])[..., 0] / n_x.sum(1, keepdim=True)
    shape = features[0].shape[2:]
    terms = n_x[:, :, None] * matches.clamp_min(0) ** SHARPNESS * n_y[:, None, :]
    return m_x.view(-1, *shape), m_y.view(-1, *shape), matches, terms


def random_pairs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)


@pytest.mark.parametrize(("name", "fast_path"), [("resnet18", True), ("affine", True), ("affine", False),
                                                  ("nonaffine", False)])
def test_matched_maps_match_float64_reference(name: str, fast_path: bool, seed: int) -> None:
    case = CASES[name]()
    size = case.input_size if fast_path else 16  # the generic path takes one pass per location: small grids
    x, y = random_pairs(3, size)
    result = SFAM(case.model, case.target_layer, "cosine", weighting="matched", fast_path=fast_path).explain(x, y)
    m_x, m_y, matches, _ = reference_matched(case, x, y)
    assert_maps_close(result.map_query, m_x, what="map_query")
    assert_maps_close(result.map_reference, m_y, what="map_reference")
    assert (result.map_query >= 0).all() and result.map_query.amax() > 0

    found = result.correspondences  # (P, k, 5): x_q, y_q, x_r, y_r, cos
    width = m_x.shape[-1]
    assert found.shape == (3, min(TOP_MATCHES, m_x[0].numel()), 5) and found.dtype == torch.float32
    p = (found[..., 1] - 0.5) * width + (found[..., 0] - 0.5)
    q = (found[..., 3] - 0.5) * width + (found[..., 2] - 0.5)
    expected = matches.gather(1, p.long()[..., None].expand(-1, -1, matches.shape[2])).gather(2, q.long()[..., None])
    assert_close(found[..., 4], expected[..., 0], what="correspondence scores")
    assert ((found[..., :4] > 0) & (found[..., :4] < m_x.shape[-1])).all()


def test_correspondences_are_the_largest_terms(seed: int) -> None:
    case = CASES["affine"]()
    x, y = random_pairs(4, case.input_size)
    result = SFAM(case.model, case.target_layer, weighting="matched").explain(x, y)
    m_x, _, _, terms = reference_matched(case, x, y)
    width = m_x.shape[-1]
    best, partner = terms.max(dim=2)  # (P, hw)
    chosen = best.topk(TOP_MATCHES, dim=1).indices  # (P, k), strongest first
    found = result.correspondences
    assert torch.equal(found[..., 0], chosen % width + 0.5) and torch.equal(found[..., 1], chosen // width + 0.5)
    q = partner.gather(1, chosen)
    assert torch.equal(found[..., 2], q % width + 0.5) and torch.equal(found[..., 3], q // width + 0.5)


def test_pair_alone_equals_pair_in_batch(seed: int) -> None:
    case = CASES["resnet18"]()
    x, y = random_pairs(64, case.input_size)
    explainer = SFAM(case.model, case.target_layer, weighting="matched")
    batch = explainer.explain(x, y)
    alone = explainer.explain(x[17:18], y[17:18])
    assert_maps_close(alone.map_query, batch.map_query[17:18], what="map_query")
    assert_maps_close(alone.map_reference, batch.map_reference[17:18], what="map_reference")
    assert_close(alone.correspondences, batch.correspondences[17:18], what="correspondences")


def test_only_matched_has_correspondences_and_unknown_weightings_fail(seed: int) -> None:
    case = CASES["affine"]()
    x, y = random_pairs(2, case.input_size)
    assert SFAM(case.model, case.target_layer).explain(x, y).correspondences is None
    with pytest.raises(ExplanationError, match="weighting='shared' is not one of cis, partner, matched"):
        SFAM(case.model, case.target_layer, weighting="shared")


@pytest.mark.parametrize(("name", "fast_path", "told"), [("affine", True, False), ("nonaffine", False, True)])
def test_matched_warns_once_where_it_takes_a_pass_per_location(name: str, fast_path: bool, told: bool, seed: int,
                                                               caplog) -> None:
    """A new user's `sfam explain --weighting matched` of a ViT ran for minutes without a word."""
    case = CASES[name]()
    explainer = SFAM(case.model, case.target_layer, weighting="matched", fast_path=fast_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.explain.sfam"):
        for _ in range(2):
            explainer.explain(*random_pairs(1, 16))
    grid = explainer.layout.grid
    expected = [f"one more pass through the head per grid location, {grid} per image"] if told else []
    assert [r.getMessage().split("first (the generic path) takes ")[-1].split(":")[0] for r in caplog.records] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(seed: int) -> None:
    case = CASES["resnet18"]()
    x, y = random_pairs(4, case.input_size)
    cpu = SFAM(case.model, case.target_layer, weighting="matched").explain(x, y)
    cuda = SFAM(copy.deepcopy(case.model).cuda(), case.target_layer, weighting="matched").explain(x.cuda(), y.cuda())
    assert cuda.map_query.is_cuda and cuda.correspondences.is_cuda
    assert_maps_close(cuda.map_query.cpu(), cpu.map_query, what="map_query")
    assert_close(cuda.correspondences.cpu(), cpu.correspondences, rel=1e-3, what="correspondences")


def test_matched_on_a_vit_with_fused_attention() -> None:
    """The generic path differentiates twice; fused attention has no second derivative (math attention does)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    result = SFAM(model, weighting="matched").explain(x, y)
    assert result.map_query.shape == (2, 2, 2) and result.correspondences.shape == (2, 4, 5)
    completeness = result.cis_query.double().sum(dim=1) + result.residual_query - result.similarity
    assert float(completeness.abs().max()) < 1e-5


def test_locations_without_a_positive_match_are_no_correspondences(seed: int) -> None:
    """Local embeddings that point away from each other (every cosine <= 0) have no shared evidence:
    both maps are zero, and the five 'matches' picked among zero terms were stored and drawn."""
    e_x = torch.rand(2, 6, 4) + 0.1  # (P, n, D): positive directions
    e_y = torch.cat([-(torch.rand(1, 6, 4) + 0.1), torch.rand(1, 6, 4) + 0.1])  # the first pair opposes x
    e_y[1, :3] = -e_y[1, :3]  # the second pair: half of y opposes x, half matches it
    evidence = shared_evidence(e_x, e_y)
    found = top_correspondences(evidence.matches, evidence.terms, width=3, k=5)  # (P, 5, 5)
    assert evidence.map_x[0].abs().max() == 0 and found[0].isnan().all()
    assert not found[1].isnan().any()  # every location of x has a positive match among y's last three
    assert (found[1, :, 2:4] >= torch.tensor([0.5, 1.5])).all()  # ... at y's locations 3-5 (row 1 of a 3-wide grid)
    assert (found[1, :, 4] <= 1).all() and (found[1, :, 4] > 0).all()
    same = top_correspondences(*shared_evidence(e_x, e_x)[:2], width=3)
    assert (same[..., 4] <= 1).all()  # cosines of identical embeddings, clamped past float32 rounding
    pixels = matches_in_pixels(found.numpy(), (2, 3), [(30, 20)] * 2, [(30, 20)] * 2)
    assert pixels[0] == [] and len(pixels[1]) == 5
