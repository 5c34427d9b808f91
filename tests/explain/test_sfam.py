"""SFAM against a float64 reference, and the properties the method (docs/method.md) promises."""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import SFAM, ExplanationError

from reference import CASES, Case, SmallNet, assert_close, assert_maps_close, reference_explanation, resnet18_embedding

METRICS = ["cosine", "dot", "euclidean"]


def random_pairs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name: str, metric: str, seed: int) -> None:
    case = CASES[name]()
    x, y = random_pairs(4, case.input_size)
    for weighting in ("cis", "partner"):
        result = SFAM(case.model, case.target_layer, metric, weighting=weighting).explain(x, y)
        ref_q = reference_explanation(case, x, y, metric)
        ref_r = reference_explanation(case, y, x, metric)
        assert_close(result.similarity, ref_q.similarity, what="similarity")
        assert_close(result.cis_query, ref_q.cis, what="cis_query")
        assert_close(result.cis_reference, ref_r.cis, what="cis_reference")
        expected_q = ref_q.map_cis if weighting == "cis" else ref_q.map_partner
        expected_r = ref_r.map_cis if weighting == "cis" else ref_r.map_partner
        assert_maps_close(result.map_query, expected_q, what="map_query")
        assert_maps_close(result.map_reference, expected_r, what="map_reference")
        if name != "nonaffine":  # first order only: the residual absorbs the head's curvature
            assert_close(result.residual_query, ref_q.residual, rel=1e-4, what="residual_query",
                         scale=ref_q.similarity.abs().max())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ["resnet18", "affine"])
def test_completeness_on_affine_heads(name: str, metric: str, seed: int) -> None:
    case = CASES[name]()
    result = SFAM(case.model, case.target_layer, metric).explain(*random_pairs(6, case.input_size))
    for cis, residual in ((result.cis_query, result.residual_query), (result.cis_reference, result.residual_reference)):
        total = cis.double().sum(1) + residual.double()
        gap = (total - result.similarity.double()).abs()
        assert (gap <= 1e-5 * result.similarity.double().abs().clamp_min(1)).all(), gap
        assert (cis.abs().sum(1) > 1e-3 * result.similarity.abs()).all()  # not a trivial split (signs may cancel)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ["resnet18", "affine"])
def test_fast_path_equals_generic_path(name: str, metric: str, seed: int) -> None:
    case = CASES[name]()
    x, y = random_pairs(5, case.input_size)
    fast = SFAM(case.model, case.target_layer, metric)
    generic = SFAM(case.model, case.target_layer, metric, fast_path=False)
    a, b = fast.explain(x, y), generic.explain(x, y)
    assert fast.is_affine is True and generic.is_affine is False
    for field in ("similarity", "cis_query", "cis_reference"):
        assert_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field)
    for field in ("map_query", "map_reference"):
        assert_maps_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field)
    for field in ("residual_query", "residual_reference"):
        assert_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field, scale=b.similarity.abs().max())


def test_nonaffine_head_takes_generic_path(seed: int) -> None:
    case = CASES["nonaffine"]()
    explainer = SFAM(case.model, case.target_layer)
    explainer.explain(*random_pairs(2, case.input_size))
    assert explainer.is_affine is False


def test_head_affine_only_near_the_first_batch_is_checked_on_every_batch(seed: int) -> None:
    """Linear-ReLU-Linear with every unit active on the first batch looks affine there; a batch
    that turns units off must not be explained with the first batch's J."""
    hidden = nn.Linear(8, 16)
    nn.init.constant_(hidden.bias, 3.0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), hidden, nn.ReLU(), nn.Linear(16, 6))
    fast, generic = SFAM(model, "0"), SFAM(model, "0", fast_path=False)
    x, y = random_pairs(3, 16)
    fast.explain(0.01 * x, 0.01 * y)  # all hidden units on: measured affine
    assert fast.is_affine is True
    x, y = (50 * torch.randn(3, 3, 1, 1) + torch.randn(3, 3, 16, 16) for _ in range(2))  # bright: some units off
    a, b = fast.explain(x, y), generic.explain(x, y)
    assert (hidden(F.adaptive_avg_pool2d(model[0](x), 1).flatten(1)) < 0).any()  # the premise
    for field in ("cis_query", "cis_reference", "residual_query"):
        assert_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field, scale=b.similarity.abs().max())


def count_saved_tensors(run) -> int:
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


def test_fast_path_builds_no_autograd_graph(seed: int) -> None:
    case = CASES["resnet18"]()
    x, y = random_pairs(3, case.input_size)
    fast = SFAM(case.model, case.target_layer)
    assert count_saved_tensors(lambda: fast.explain(x, y)) == 0
    result = fast.explain(x, y)
    assert all(t.grad_fn is None and not t.requires_grad for t in vars(result).values() if t is not None)
    with torch.inference_mode():  # works where autograd cannot run at all
        inside = fast.explain(x, y)
    assert_close(inside.cis_query, result.cis_query, rel=1e-6)
    generic = SFAM(case.model, case.target_layer, fast_path=False)
    assert count_saved_tensors(lambda: generic.explain(x, y)) > 0  # the counter does count


def test_features_build_no_autograd_graph(seed: int) -> None:
    """`features` (the maps and embeddings, as the baselines read them) keeps nothing for a backward pass."""
    case = CASES["resnet18"]()
    images = torch.randn(3, 3, case.input_size, case.input_size, dtype=torch.float64)  # cast to the model's dtype
    explainer = SFAM(case.model, case.target_layer)
    assert count_saved_tensors(lambda: explainer.features(images)) == 0
    maps, embeddings = explainer.features(images)
    assert not maps.requires_grad and not embeddings.requires_grad and maps.dtype == torch.float32
    assert maps.shape[:2] == (3, 512) and embeddings.shape[0] == 3


def test_generic_path_runs_inside_inference_mode(seed: int) -> None:
    case = CASES["nonaffine"]()
    x, y = random_pairs(3, case.input_size)
    explainer = SFAM(case.model, case.target_layer)
    with torch.inference_mode():
        inside = explainer.explain(x, y)
    assert_close(inside.cis_query, explainer.explain(x, y).cis_query, rel=1e-6)


def test_identity_head_cosine_cis_is_symmetric(seed: int) -> None:
    model = resnet18_embedding(dim=None)
    x, y = random_pairs(4, 64)
    result = SFAM(model, "layer4", "cosine").explain(x, y)
    assert_close(result.cis_query, result.cis_reference, rel=1e-5, what="symmetry")
    features = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: features.append(out.double()))
    with torch.no_grad():
        model(x), model(y)
    handle.remove()
    a_x, a_y = (F.normalize(f.mean(dim=(2, 3)), dim=1) for f in features)
    assert_close(result.cis_query, a_x * a_y, rel=1e-5, what="cis = a_x a_y")


class Permuted(nn.Module):
    def __init__(self, perm: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", perm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, self.perm]


@pytest.mark.parametrize("metric", METRICS)
def test_channel_permutation_equivariance(metric: str, seed: int) -> None:
    model = resnet18_embedding()
    perm = torch.randperm(512)
    permuted = copy.deepcopy(model)
    permuted.layer4 = nn.Sequential(permuted.layer4, Permuted(perm))
    with torch.no_grad():
        permuted.fc.weight.copy_(model.fc.weight[:, perm])
    x, y = random_pairs(3, 64)
    plain = SFAM(model, "layer4", metric).explain(x, y)
    moved = SFAM(permuted, "layer4", metric).explain(x, y)
    assert_close(moved.similarity, plain.similarity, rel=1e-5)
    assert_close(moved.cis_query, plain.cis_query[:, perm], rel=1e-5)
    assert_close(moved.cis_reference, plain.cis_reference[:, perm], rel=1e-5)
    assert_close(moved.map_query, plain.map_query, rel=1e-4)


@pytest.mark.parametrize("scale", [7.3, 2e-14])  # 2e-14: norms below 1e-12, as untrained weights give
@pytest.mark.parametrize("weighting", ["cis", "matched"])
def test_cosine_explanation_invariant_to_embedding_scale(scale: float, weighting: str, seed: int) -> None:
    model = resnet18_embedding()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc.weight.mul_(scale)
        scaled.fc.bias.mul_(scale)
    x, y = random_pairs(3, 64)
    plain = SFAM(model, "layer4", weighting=weighting).explain(x, y)
    rescaled = SFAM(scaled, "layer4", weighting=weighting).explain(x, y)
    assert_close(rescaled.similarity, plain.similarity, rel=1e-5)
    assert_close(rescaled.cis_query, plain.cis_query, rel=1e-5)
    evidence = scale if weighting == "matched" else 1.0  # the matched map is in units of the local embeddings
    assert_close(rescaled.map_reference, plain.map_reference * evidence, rel=1e-5)
    if weighting == "matched":
        assert torch.equal(rescaled.correspondences[..., :4], plain.correspondences[..., :4])


@pytest.mark.parametrize("name", ["resnet18", "nonaffine"])
def test_pair_alone_equals_pair_in_batch_of_64(name: str, seed: int) -> None:
    case = CASES[name]()
    x, y = random_pairs(64, case.input_size)
    explainer = SFAM(case.model, case.target_layer)
    batch = explainer.explain(x, y)
    alone = explainer.explain(x[17:18], y[17:18])
    for field in ("similarity", "cis_query", "cis_reference"):
        assert_close(getattr(alone, field)[0], getattr(batch, field)[17], rel=1e-5, what=field)
    for field in ("map_query", "map_reference"):
        assert_maps_close(getattr(alone, field), getattr(batch, field)[17:18], rel=1e-5, what=field)


def test_shared_images_are_forwarded_once(seed: int) -> None:
    """explain_pairs over distinct images equals explain over the expanded pairs."""
    case = CASES["resnet18"]()
    images = torch.randn(5, 3, 64, 64)
    query = torch.tensor([0, 0, 0, 1, 1])
    reference = torch.tensor([2, 3, 4, 2, 4])
    explainer = SFAM(case.model, case.target_layer)
    indexed = explainer.explain_pairs(images, query, reference)
    expanded = explainer.explain(images[query], images[reference])
    for field in ("similarity", "cis_query", "cis_reference", "map_query", "map_reference"):
        assert_close(getattr(indexed, field), getattr(expanded, field), rel=1e-5, what=field)


class NormalisedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.features(images).mean(dim=(2, 3))), dim=1)


class ScaledNormalisedNet(NormalisedNet):
    """Invariant to the scale of its features without unit norm: the contributions cancel (no
    bias, so the output is homogeneous in the features), the norms do not give it away."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 3.0 * super().forward(images)


@pytest.mark.parametrize("batch", [1, 4])
def test_scale_invariant_model_needs_embedding_layer(batch: int, seed: int) -> None:
    with pytest.raises(ExplanationError, match="embedding_layer='fc'"):
        SFAM(ScaledNormalisedNet().eval(), "features", metric="dot").explain(*random_pairs(batch, 32))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_a_near_orthogonal_pair_on_a_nonaffine_head_is_explained(metric: str, seed: int) -> None:
    """sum(CIS) = s - residual is about zero when s is: one such pair (an ordinary negative) was
    refused as L2-normalised. The refusal reads only pairs whose u . v is not about zero."""
    body, fc = nn.Conv2d(3, 3, 1, bias=False), nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        body.weight.copy_(torch.eye(3)[:, :, None, None])
        fc.weight.copy_(torch.eye(3))
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc, nn.Tanh()).eval()
    x = torch.tensor([0.5, 0.5, 0.0])[None, :, None, None] + 1e-3 * torch.randn(1, 3, 8, 8)
    y = torch.tensor([0.5, -0.5, 0.3])[None, :, None, None] + 1e-3 * torch.randn(1, 3, 8, 8)
    result = SFAM(model, "0", metric).explain(x, y)
    assert result.similarity.abs() < 1e-2 < result.cis_query.abs().sum()  # the premise: it cancels
    assert (result.cis_query.sum() + result.residual_query - result.similarity).abs() < 1e-6  # completeness


def test_normalising_model_needs_embedding_layer(seed: int) -> None:
    model = NormalisedNet().eval()
    x, y = random_pairs(4, 32)
    with pytest.raises(ExplanationError, match="embedding_layer='fc'"):
        SFAM(model, "features").explain(x, y)
    result = SFAM(model, "features", embedding_layer="fc").explain(x, y)
    # the reference: the same model without the normalisation, explained on fc's output
    case = Case(model, "features", lambda m, a: m.fc(a))
    reference = reference_explanation(case, x, y, "cosine")
    assert_close(result.similarity, F.cosine_similarity(model(x), model(y)), rel=1e-5)
    assert_close(result.cis_query, reference.cis, what="cis_query")
    assert result.map_query.amax(dim=(1, 2)).gt(0).all()


def test_default_target_layer_and_unknown_names(seed: int) -> None:
    model = resnet18_embedding()
    explainer = SFAM(model)
    explainer.explain(*random_pairs(1, 64))
    assert explainer.target_layer == "layer4"
    with pytest.raises(ExplanationError, match="layer4"):
        SFAM(model, target_layer="layer5")
    with pytest.raises(ExplanationError, match="embedding_layer 'fcc'.*fc"):
        SFAM(model, embedding_layer="fcc")
    with pytest.raises(ExplanationError, match="metric='manhattan' is not one of cosine, dot, euclidean$"):
        SFAM(model, metric="manhattan")
    with pytest.raises(ExplanationError, match="metric='cosin' .*; did you mean: cosine"):
        SFAM(model, metric="cosin")


def test_default_target_layer_of_small_net(seed: int) -> None:
    explainer = SFAM(SmallNet(nn.Linear(16, 4)).eval())
    explainer.explain(*random_pairs(1, 32))
    assert explainer.target_layer == "features"


LOW_PRECISION = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float32, torch.bfloat16)]
if torch.cuda.is_available():
    LOW_PRECISION.append((torch.float16, torch.float16))


@pytest.mark.parametrize(("model_dtype", "input_dtype"), LOW_PRECISION)
def test_low_precision(model_dtype: torch.dtype, input_dtype: torch.dtype, seed: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = CASES["resnet18"]()
    x, y = random_pairs(3, case.input_size)
    exact = SFAM(case.model, case.target_layer).explain(x, y)
    low_model = copy.deepcopy(case.model).to(device=device, dtype=model_dtype)
    explainer = SFAM(low_model, case.target_layer)
    low = explainer.explain(x.to(device, input_dtype), y.to(device, input_dtype))
    assert explainer.is_affine is True
    assert low.similarity.dtype == torch.float32 and low.similarity.device.type == device
    assert_close(low.similarity, exact.similarity, rel=5e-2, what="similarity")
    correlation = torch.corrcoef(torch.stack([low.cis_query.cpu().flatten(), exact.cis_query.flatten()]))
    assert correlation[0, 1] > 0.95


def test_embedding_that_ignores_the_picture_is_named(seed: int) -> None:
    """A zero-initialised head (torchvision's ViT heads without weights) leaves no layer with influence."""
    head = nn.Linear(8, 4)
    nn.init.zeros_(head.weight)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    with pytest.raises(ExplanationError, match="does not depend on the picture.*load the model's weights"):
        SFAM(model).explain(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))


def test_generic_path_keeps_no_graph_before_the_target_layer(seed: int) -> None:
    """Activations before the target layer are not kept for gradients nobody asks for (memory)."""
    model = resnet18_embedding()
    seen: dict[str, bool] = {}

    def recorder(where: str):  # the last forward is the explanation's
        return lambda _module, _inputs, output: seen.update({where: output.requires_grad})

    model.layer3.register_forward_hook(recorder("before"))
    model.fc.register_forward_hook(recorder("after"))
    result = SFAM(model, "layer4", fast_path=False).explain(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert seen == {"before": False, "after": True} and torch.is_grad_enabled()
    assert_close(result.cis_query.double().sum(1) + result.residual_query.double(), result.similarity, rel=1e-5, scale=1.0)


class SharedBlockNet(nn.Module):
    """One block applied twice (weight sharing): h1 = block(stem(x)), h2 = block(h1), u = fc(GAP(h1 + h2))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first = self.block(F.relu(self.stem(images)))
        return self.fc((first + self.block(first)).mean(dim=(2, 3)))


def test_a_target_layer_that_runs_twice_is_refused(seed: int) -> None:
    """Only its last use got a gradient: the first use's share went to the residual, silently."""
    with pytest.raises(ExplanationError, match="target_layer='block' runs 2 times per forward pass"):
        SFAM(SharedBlockNet().eval(), "block", metric="dot").explain(*random_pairs(2, 16))
    default = SFAM(SharedBlockNet().eval(), metric="dot")  # never the default: it was, and then refused
    default.explain(*random_pairs(2, 16))
    assert default.target_layer == "stem"


class TupleNet(SmallNet):
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = super().forward(images)
        return u, u.norm(dim=1)


@pytest.mark.parametrize("target_layer", [None, "features"])
def test_a_model_that_returns_a_tuple_is_told_to_name_its_embedding(target_layer: str | None, seed: int) -> None:
    """The hint was never reached: choosing the target layer raised AttributeError on the tuple first."""
    model = TupleNet(nn.Linear(16, 4)).eval()
    with pytest.raises(ExplanationError, match="the model's output is tuple, not a .* pass embedding_layer="):
        SFAM(model, target_layer).explain(*random_pairs(2, 32))
    SFAM(model, target_layer, embedding_layer="head").explain(*random_pairs(2, 32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_images_that_are_not_finite_are_refused(bad: float, seed: int) -> None:
    """A NaN image read as 'no layer influences the embedding', and turned the fast path off for good."""
    explainer = SFAM(SmallNet(nn.Linear(16, 4)).eval())
    x, y = random_pairs(2, 32)
    x[1, 0, 3, 3] = bad
    with pytest.raises(ExplanationError, match="images hold NaN or infinite values"):
        explainer.explain(x, y)
    explainer.explain(*random_pairs(2, 32))
    assert explainer.is_affine is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_normalising_model_in_16_bits_is_refused(dtype: torch.dtype, seed: int) -> None:
    """Its norms are 1 only to the dtype's precision (0.998 in bfloat16): the float32 test let it through."""
    model = NormalisedNet().eval().to(dtype)
    with pytest.raises(ExplanationError, match="embedding_layer='fc'"):
        SFAM(model, "features").explain(*(images.to(dtype) for images in random_pairs(4, 32)))


@pytest.mark.parametrize("metric", METRICS)
def test_generic_path_completeness_in_bfloat16(metric: str, seed: int) -> None:
    """sum(CIS) + residual = similarity to float32 rounding: the partner vector is float64, as the similarity."""
    head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    explainer = SFAM(SmallNet(head).eval().to(torch.bfloat16), "features", metric=metric, fast_path=False)
    result = explainer.explain(*(images.to(torch.bfloat16) for images in random_pairs(4, 32)))
    for cis, residual in ((result.cis_query, result.residual_query), (result.cis_reference, result.residual_reference)):
        error = (cis.double().sum(dim=1) + residual.double() - result.similarity.double()).abs()
        scale = cis.double().abs().sum(dim=1) + residual.double().abs() + result.similarity.double().abs()
        assert (error <= 1e-6 * scale).all(), (error / scale).max()  # float32 rounding of the stored terms


class AssertingHead(nn.Module):
    """A head whose own check refuses a batch of another size than the trunk's (as user code may)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        assert pooled.shape[0] in (1, 2), "batch changed"
        return self.fc(pooled)


def test_a_head_whose_probe_raises_anything_takes_the_generic_path(seed: int) -> None:
    explainer = SFAM(SmallNet(AssertingHead()).eval(), "features")
    result = explainer.explain(*random_pairs(1, 32))
    assert explainer.is_affine is False and torch.isfinite(result.similarity).all()


def test_a_target_layer_without_a_grid_is_named(seed: int) -> None:
    with pytest.raises(ExplanationError, match=r"target_layer='head': a \(1, 4\) output is not a feature map"):
        SFAM(SmallNet(nn.Linear(16, 4)).eval(), "head").explain(*random_pairs(1, 32))


def test_the_model_keeps_its_own_mode(seed: int) -> None:
    """Explained in eval mode (dropout off, BatchNorm's running statistics), each module's mode
    restored after: a model explained while it trains (a monitoring hook) used to stay in eval."""
    model = CASES["resnet18"]().model.train()
    model.layer1.eval()  # a part frozen by its owner stays as it was
    x, y = random_pairs(2, 64)
    explainer = SFAM(model, "layer4")
    result = explainer.explain(x, y)
    assert model.training and not model.layer1.training and model.layer4.training
    model.eval()
    assert_close(explainer.explain(x, y).cis_query, result.cis_query, rel=1e-6)  # the same, in eval as in train
    running_mean = model.bn1.running_mean.clone()
    model.train()
    explainer.features(x)
    assert model.training and torch.equal(model.bn1.running_mean, running_mean)  # no statistics updated


def test_images_without_a_batch_dimension_are_named(seed: int) -> None:
    """Two (3, H, W) images: the message names the shape given, not the two joined."""
    case = CASES["affine"]()
    x, y = random_pairs(1, case.input_size)
    with pytest.raises(ExplanationError, match=rf"must be batches \(B, 3, H, W\), got \(3, {case.input_size}, {case.input_size}\)"):
        SFAM(case.model, case.target_layer).explain(x[0], y[0])


def test_threads_sharing_a_model_take_turns(seed: int) -> None:
    """Two threads explaining with one model (one explainer, or one each): the hooks one call sets
    on the model's modules are its own, the results are those of one thread alone, the mode is kept."""
    model = CASES["resnet18"]().model.train()
    batches = [random_pairs(2, 64) for _ in range(2)]
    shared = SFAM(model, "layer4")
    alone = [shared.explain(*batch).similarity for batch in batches]
    explainers = [shared, SFAM(model, model.layer4, fast_path=False)]
    failures: list[BaseException] = []

    def explain_repeatedly(index: int) -> None:
        try:
            for _ in range(10):
                assert_close(explainers[index].explain(*batches[index]).similarity, alone[index], rel=1e-5)
        except BaseException as error:  # reported in the main thread
            failures.append(error)

    threads = [threading.Thread(target=explain_repeatedly, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert model.training


def test_layers_given_as_modules_or_by_any_of_their_names(seed: int) -> None:
    """Modules, as Grad-CAM libraries take them; a module registered under two names by either."""
    model = CASES["resnet18"]().model
    model.features = model.layer4  # an alias, as wrappers of backbones make them
    x, y = random_pairs(2, 64)
    expected = SFAM(model, "layer4").explain(x, y)
    for given in (model.layer4, "features"):
        explainer = SFAM(model, given, embedding_layer=model.fc)
        assert explainer.target_layer in ("layer4", "features") and explainer.embedding_layer == "fc"
        assert_close(explainer.explain(x, y).cis_query, expected.cis_query, rel=1e-6)
    with pytest.raises(ExplanationError, match=r"'layr4' is not a module of the model \(ResNet\); did you mean: layer4"):
        SFAM(model, "layr4")
    with pytest.raises(ExplanationError, match=r"'encoder.ln' is not a module of the model \(ResNet\); its top-level "
                                               r"modules: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, "
                                               r"fc \(a nested one is named with dots"):  # a ViT's layer: nothing resembles it
        SFAM(model, "encoder.ln")
    with pytest.raises(ExplanationError, match=r"target_layer: the Conv2d given is not a module of the model \(ResNet\)"):
        SFAM(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ExplanationError, match=r"embedding_layer must be a module of the model or its name \(e.g. 'layer4'\), not int 4"):
        SFAM(model, "layer4", embedding_layer=4)


class WithLogits(SmallNet):
    """A classification-trained embedding net: forward returns (embedding, logits)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(16, 8))
        self.classifier = nn.Linear(8, 5)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = super().forward(images)
        return u, self.classifier(u)


class Unflattened(SmallNet):
    """A 1 x 1 convolution head: forward returns (B, D, 1, 1)."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images))


def test_an_output_that_is_no_embedding_names_the_way_to_one(seed: int) -> None:
    x, y = random_pairs(2, 32)
    with pytest.raises(ExplanationError, match=r"the model's output is tuple, not a \(B, D\) embedding tensor; pass "
                                               r"embedding_layer= to name the module that outputs the embedding: 'head' outputs its "
                                               r"item 0, 'classifier' outputs its item 1"):
        SFAM(WithLogits().eval()).explain(x, y)
    explained = SFAM(WithLogits().eval(), embedding_layer="head").explain(x, y)  # as the message says
    assert explained.similarity.shape == (2,)
    with pytest.raises(ExplanationError, match=r"output is \(1, 16, 1, 1\), .* or give a factory whose model returns it"):
        SFAM(Unflattened().eval()).explain(x, y)


def test_empty_batches_are_named(seed: int) -> None:
    case = CASES["affine"]()
    x, y = random_pairs(0, case.input_size)
    with pytest.raises(ExplanationError, match="no pairs to explain: the batches are empty"):
        SFAM(case.model, case.target_layer).explain(x, y)


def test_a_vit_explained_at_another_input_size_reads_its_grid_again(seed: int) -> None:
    """A ViT that takes any input size: the second size's grid and head are its own, as a new explainer's."""
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=64, depth=2,
                              embed_dim=64, num_heads=2, dynamic_img_size=True).eval()
    explainer = SFAM(model)
    explainer.explain(*random_pairs(2, 64))
    x, y = random_pairs(2, 96)
    result, fresh = explainer.explain(x, y), SFAM(model).explain(x, y)
    assert result.map_query.shape[-2:] == (6, 6) and explainer.layout.height == 6
    assert_close(result.cis_query, fresh.cis_query, rel=1e-5)
    assert_maps_close(result.map_query, fresh.map_query, rel=1e-5)
