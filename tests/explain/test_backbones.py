"""ViT (torchvision, timm CLIP- and DINOv2-style), Swin and ConvNeXt: layouts, LayerNorm-aware
completeness against float64 references, default target layers, repeated images."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionPool2d
from torch import nn

from pipeline import SFAM, ExplanationError
from pipeline.explain.layout import FeatureLayout, detect_layout
from pipeline.explain.metrics import partner_vector, similarity

from backbones import (
    BACKBONES,
    attention_pooled_vit_head,
    convnext_head,
    mean_pooled_vit_entry_head,
    mean_pooled_vit_head,
    swin_head,
    timm_vit,
    timm_vit_entry_head,
    timm_vit_head,
    torchvision_backbone,
)
from reference import Reference, assert_close, assert_maps_close

METRICS = ["cosine", "dot", "euclidean"]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Each backbone built once per module (random weights): tests must not change them."""
    torch.manual_seed(0)
    return {name: backbone.make() for name, backbone in BACKBONES.items()}


def pairs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)


def reference_cis(
    model: nn.Module, layer: str, head: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    to_maps: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, metric: str,
) -> Reference:
    """x's explanation given y in float64: the layer's output z, the linearised head written by
    hand, CIS_k = sum over the patch grid of z * d(u . v)/dz, and the maps from each channel's
    weight at each location, W_kp = h*w * d(u . v)/dz_kp (docs/method.md, Maps)."""
    model = copy.deepcopy(model).double()
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(x.double()), model(y.double())
    handle.remove()
    z_x = seen[0].detach().requires_grad_()
    u_x = head(model, z_x)
    with torch.no_grad():
        u_y = head(model, seen[1])
    v = partner_vector(metric, u_x.detach(), u_y)
    (gradient,) = torch.autograd.grad((u_x * v).sum(), z_x)
    features, dsim = to_maps(z_x.detach()), to_maps(gradient)  # (P, K, h, w)
    cis = (features * dsim).sum(dim=(2, 3))
    weights = dsim * dsim[0, 0].numel()
    s = similarity(metric, u_x.detach(), u_y)
    emphasis = features.mean(dim=(2, 3), keepdim=True).abs()
    map_cis = (emphasis * weights * features).sum(1) / cis.abs().sum(1)[:, None, None]
    return Reference(s, weights, cis, s - cis.sum(dim=1), map_cis.clamp_min(0), (weights * features).sum(1))


REFERENCES = {  # backbone: (layer, linearised head, layout of the layer's output)
    ("convnext_tiny", "features"): (convnext_head, "nchw"),
    ("swin_t", "features"): (swin_head, "nhwc"),
    ("clip", "pos_drop"): (timm_vit_entry_head, "tokens"),  # the default: through CLIP's pre-norm and every block
    ("clip", "blocks.1"): (timm_vit_head, "tokens"),  # the input of the last block
    ("dinov2_reg4", "pos_drop"): (timm_vit_entry_head, "tokens"),
    ("dinov2_reg4", "blocks.1"): (timm_vit_head, "tokens"),
    ("mean_pooled", "pos_drop"): (mean_pooled_vit_entry_head, "tokens"),  # the default
    ("mean_pooled", "blocks"): (mean_pooled_vit_head, "tokens"),  # the last block's output
    ("siglip", "norm"): (attention_pooled_vit_head, "tokens"),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("name", "layer"), list(REFERENCES))
def test_matches_linearised_float64_reference(name: str, layer: str, metric: str, models: dict, seed: int) -> None:
    head, kind = REFERENCES[name, layer]
    model, size = models[name], BACKBONES[name].size
    x, y = pairs(3, size)
    explainer = SFAM(model, layer, metric, feature_layout=kind)
    result = explainer.explain(x, y)
    expected = reference_cis(model, layer, head, explainer.layout.to_maps, x, y, metric)
    s = expected.similarity
    assert_close(result.similarity, s, rel=1e-4, what="similarity")
    assert_close(result.cis_query, expected.cis, rel=1e-3, what="cis_query")
    assert_close(result.residual_query, expected.residual, rel=1e-4, what="residual", scale=s.abs().max())
    total = result.cis_query.double().sum(1) + result.residual_query.double()
    assert_close(total, result.similarity, rel=1e-5, what="completeness", scale=1.0)
    assert_maps_close(result.map_query, expected.map_cis, rel=1e-3, what="map_query (cis)")
    partner = SFAM(model, layer, metric, feature_layout=kind, weighting="partner").explain(x, y)
    assert_close(partner.map_query, expected.map_partner, rel=1e-3, what="map_query (partner)")
    # the partner map spreads exactly the CIS over the grid, whether or not the head pools first
    assert_close(partner.map_query.double().mean(dim=(1, 2)), expected.cis.sum(1), rel=1e-3, what="map mean",
                 scale=expected.cis.abs().sum(1).max())


@pytest.mark.parametrize("name", list(BACKBONES))
def test_default_target_layer_and_layout(name: str, models: dict, seed: int) -> None:
    backbone = BACKBONES[name]
    explainer = SFAM(models[name])
    result = explainer.explain(*pairs(2, backbone.size))
    assert explainer.target_layer == backbone.default_target
    assert (explainer.layout.kind, explainer.layout.prefix) == backbone.layout
    grid = (explainer.layout.height, explainer.layout.width)
    assert result.map_query.shape == result.map_reference.shape == (2, *grid)
    assert result.cis_query.shape[1] == explainer.features(torch.randn(1, 3, backbone.size, backbone.size))[0].shape[1]


@pytest.mark.parametrize(("make", "default"), [
    (lambda: timm_vit("vit_small_patch16_224", 64, global_pool="avg", class_token=False, pre_norm=True), "pos_drop"),
    # register tokens join after the patch embedding, at pos_drop: the tokens entering the first block all the same
    (lambda: timm_vit("vit_small_patch16_224", 64, global_pool="avg", class_token=False, reg_tokens=4), "pos_drop"),
    # no position embedding: the patch embedding's tokens enter the first block as they are
    (lambda: timm_vit("vit_small_patch16_224", 64, global_pool="avg", class_token=False, pos_embed="none"), "blocks"),
    (lambda: timm.create_model("mixer_s16_224", pretrained=False, num_classes=0, img_size=64), "norm"),  # MLP-Mixer
])
def test_mean_pooling_moves_the_default_only_after_a_position_embedding(make, default: str, seed: int) -> None:
    """The tokens entering the first block are the grid after the patch embedding's; where nothing
    comes between the two, the default stays the last grid, never the patch embedding."""
    explainer = SFAM(make().eval())
    explainer.explain(*pairs(1, 64))
    assert explainer.target_layer == default


@pytest.mark.parametrize(("name", "layer"), [("convnext_tiny", "features"), ("swin_t", "permute"),
                                             ("mean_pooled", "blocks")])  # the last: a mean-pooled ViT's last block
@pytest.mark.parametrize("metric", METRICS)
def test_layernorm_heads_keep_a_backward_free_fast_path(name: str, layer: str, metric: str, models: dict,
                                                        seed: int) -> None:
    """ConvNeXt's GAP -> LayerNorm head is affine once its deviation is held per image: the fast
    path applies, equals the generic path, and the CIS are complete and not trivial."""
    model, size = models[name], BACKBONES[name].size
    x, y = pairs(4, size)
    fast = SFAM(model, layer, metric=metric)
    a = fast.explain(x, y)
    generic = SFAM(model, fast.target_layer, metric, fast_path=False)
    b = generic.explain(x, y)
    assert fast.is_affine is True and generic.is_affine is False
    for field in ("similarity", "cis_query", "cis_reference"):
        assert_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field)
    for field in ("map_query", "map_reference"):
        assert_maps_close(getattr(a, field), getattr(b, field), rel=1e-4, what=field)
    for cis, residual in ((a.cis_query, a.residual_query), (a.cis_reference, a.residual_reference)):
        assert_close(cis.double().sum(1) + residual.double(), a.similarity, rel=1e-5, what="completeness", scale=1.0)
        assert (cis.abs().sum(1) > 1e-3 * a.similarity.abs()).all()


def test_model_ending_in_layernorm_is_not_refused(models: dict, seed: int) -> None:
    """ConvNeXt ends in a LayerNorm: not L2-normalised, its CIS must not cancel."""
    result = SFAM(models["convnext_tiny"], "features", fast_path=False).explain(*pairs(3, 64))
    assert (result.cis_query.sum(1).abs() > 1e-2 * result.cis_query.abs().sum(1)).any()


class LayerNormedNormalised(nn.Module):
    """conv -> GAP -> Linear -> LayerNorm -> L2 normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(self.fc(self.features(images).mean(dim=(2, 3)))), dim=1)


def test_l2_normalised_output_still_refused_with_a_layer_after_the_target(seed: int) -> None:
    model = LayerNormedNormalised().eval()
    x, y = pairs(3, 32)
    with pytest.raises(ExplanationError, match="embedding_layer='norm'"):
        SFAM(model, "features").explain(x, y)
    result = SFAM(model, "features", embedding_layer="norm").explain(x, y)
    assert_close(result.cis_query.double().sum(1) + result.residual_query.double(), result.similarity,
                 rel=1e-5, scale=1.0)


@pytest.mark.parametrize("name", ["clip", "dinov2_reg4"])
def test_target_without_influence_names_a_better_layer(name: str, models: dict, seed: int) -> None:
    """The last block's patch tokens (and the final norm's) never reach the class token."""
    for layer in ("blocks.2", "norm"):
        with pytest.raises(ExplanationError, match=r"no influence.*target_layer='pos_drop'"):
            SFAM(models[name], layer).explain(*pairs(1, BACKBONES[name].size))


def test_a_named_layer_of_a_constant_embedding_is_told_so(seed: int) -> None:
    """Weights of zeros (a checkpoint's wrapper key holding another state): the named layer's error
    said "pass target_layer=", from looking for a better layer, when one was passed."""
    model = timm_vit("vit_small_patch16_224", 64).eval()
    torch.nn.init.zeros_(model.norm.weight)
    torch.nn.init.zeros_(model.norm.bias)
    with pytest.raises(ExplanationError, match=r"^target_layer='blocks.1' has no influence on the embedding.*: no layer "
                                               r"of the model has any; is the embedding constant"):
        SFAM(model, "blocks.1").explain(*pairs(1, 64))


@pytest.mark.parametrize("name", ["clip", "dinov2_reg4"])
def test_repeated_images_in_explain_pairs(name: str, models: dict, seed: int) -> None:
    """A batch of distinct images whose pairs repeat them (the job's case) equals the pairs
    explained one by one; the generic path forwards each distinct image once.

    Each pair is explained beside one other (its own images, then the first pair's): the random
    CLIP is nearly scale invariant at its default layer (doubling it moves the embedding by about
    1e-6), so one pair's contributions can cancel by chance, and a lone such pair is refused as
    L2-normalised (about 1 seed in 200)."""
    size = BACKBONES[name].size
    images = torch.randn(4, 3, size, size)
    query, reference = torch.tensor([0, 0, 0, 1, 3, 2]), torch.tensor([1, 2, 3, 2, 0, 0])
    explainer = SFAM(models[name])
    batch = explainer.explain_pairs(images, query, reference)
    for p in range(query.shape[0]):
        other = 1 if p == 0 else 0
        beside = explainer.explain(images[query[[p, other]]], images[reference[[p, other]]])
        for field in ("similarity", "cis_query", "cis_reference", "residual_query"):
            assert_close(getattr(batch, field)[p], getattr(beside, field)[0], rel=1e-4, what=field,
                         scale=batch.similarity.abs().max())
        for field in ("map_query", "map_reference"):
            assert_maps_close(getattr(batch, field)[p:p + 1], getattr(beside, field)[:1], rel=1e-4, what=field)


@pytest.fixture(scope="module")
def vit_b_16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision_backbone("vit_b_16")


def test_torchvision_vit_b_16(vit_b_16: nn.Module, seed: int) -> None:
    """At its required 224 px: default target is the tokens entering the first block, with a class
    token on a 14x14 grid, the job's repeated images work and CIS + residual = similarity."""
    images = torch.randn(3, 3, 224, 224)
    query, reference = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    explainer = SFAM(vit_b_16)
    result = explainer.explain_pairs(images, query, reference)
    assert explainer.target_layer == "encoder.dropout"
    assert explainer.layout == FeatureLayout("tokens", 14, 14, prefix=1)
    assert result.cis_query.shape == (3, 768) and result.map_query.shape == (3, 14, 14)
    assert_close(result.cis_query.double().sum(1) + result.residual_query.double(), result.similarity,
                 rel=1e-5, scale=1.0)
    alone = explainer.explain(images[2:3], images[1:2])  # pair 2 seen from the other side
    assert_close(alone.cis_query[0], result.cis_reference[2], rel=1e-4, what="cis")
    with pytest.raises(ExplanationError, match="encoder.dropout"):
        SFAM(vit_b_16, "encoder.ln").explain(images[:1], images[1:2])


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((2, 8, 5, 10), FeatureLayout("nchw", 5, 10)), ((2, 5, 10, 8), FeatureLayout("nhwc", 5, 10)),
     ((2, 33, 8), FeatureLayout("tokens", 4, 8, prefix=1)), ((2, 37, 8), FeatureLayout("tokens", 4, 8, prefix=5))],
)
def test_layout_round_trip(shape: tuple[int, ...], layout: FeatureLayout, seed: int) -> None:
    output = torch.randn(shape)
    detected = detect_layout(output.shape, (40, 80), prefix_hint=layout.prefix or None)
    assert detected == layout
    maps = detected.to_maps(output)
    assert maps.shape == (2, 8, layout.height, layout.width)
    assert torch.equal(detected.from_maps(maps, output), output)
    if layout.kind == "tokens":  # GAP is the mean over the patch tokens only
        torch.testing.assert_close(maps.mean(dim=(2, 3)), output[:, layout.prefix:].mean(dim=1))
        replaced = detected.from_maps(torch.zeros(3, *maps.shape[1:]), output)  # probe batches
        assert torch.equal(replaced[:, :layout.prefix], output[:1, :layout.prefix].expand(3, -1, -1))


def test_layout_settings_and_errors() -> None:
    assert detect_layout(torch.Size([2, 7, 7, 7]), (224, 224)).kind == "nchw"  # convention when both fit
    assert detect_layout(torch.Size([2, 7, 7, 7]), (224, 224), "nhwc").kind == "nhwc"
    assert detect_layout(torch.Size([2, 21, 8]), (56, 56), prefix_tokens=5) == FeatureLayout("tokens", 4, 4, 5)
    with pytest.raises(ExplanationError, match="set prefix_tokens"):
        detect_layout(torch.Size([2, 50, 8]), (32, 32))
    with pytest.raises(ExplanationError, match="prefix_tokens=2"):
        detect_layout(torch.Size([2, 21, 8]), (56, 56), prefix_tokens=2)
    with pytest.raises(ExplanationError, match="set feature_layout"):
        detect_layout(torch.Size([2, 100, 300, 9]), (32, 32))
    with pytest.raises(ExplanationError, match="feature_layout='nwhc'"):
        SFAM(nn.Identity(), feature_layout="nwhc")
    # the default layer's search reads only grids of the image: ConvNeXt's pooled (2, 640, 1, 1) as 640 x 1 was one
    with pytest.raises(ExplanationError, match=r"feature_layout='nhwc' reads a \(2, 640, 1, 1\) output as a 640x1 grid"):
        detect_layout(torch.Size([2, 640, 1, 1]), (64, 64), "nhwc", strict=True)
    # a setting that reads another layer's shape: a new user's swin_t `features.5` as 14 channels of a 14 x 384 grid
    with pytest.raises(ExplanationError, match=r"as a 14x384 grid, .* read as nhwc: set feature_layout nhwc, or auto"):
        detect_layout(torch.Size([1, 14, 14, 384]), (224, 224), "nchw")
    with pytest.raises(ExplanationError, match=r"as a 512x7 grid, .* read as nchw: set feature_layout nchw, or auto"):
        detect_layout(torch.Size([1, 512, 7, 7]), (224, 224), "nhwc")
    with pytest.raises(ExplanationError, match=r"as a 14x300 grid, .*: leave feature_layout to auto"):
        detect_layout(torch.Size([1, 9, 14, 300]), (224, 224), "nchw")  # wider than the image
    with pytest.raises(ExplanationError, match=r"\(2, 197, 384\) output, which is tokens .*: set feature_layout tokens"):
        detect_layout(torch.Size([2, 197, 384]), (224, 224), "nchw")
    with pytest.raises(ExplanationError, match=r"which is a map .*: set feature_layout nchw or nhwc, or auto"):
        detect_layout(torch.Size([2, 7, 7, 7]), (224, 224), "tokens")
    # a named layer whose grid no stride gives (Inception's unpadded convolutions: 35 x 35 of 299 px) is read as set
    assert detect_layout(torch.Size([2, 288, 35, 35]), (299, 299), "nchw") == FeatureLayout("nchw", 35, 35)


def test_a_layout_setting_never_reads_another_shape_as_a_grid(models: dict, seed: int) -> None:
    """feature_layout=nhwc on a ViT, which has no channels-last output: its patch embedding
    (1, 64, 4, 4) was read as a 64 x 4 grid of 4 channels, and explained."""
    with pytest.raises(ExplanationError, match="feature grid of feature_layout='nhwc' that influences"):
        SFAM(models["clip"], feature_layout="nhwc").explain(*pairs(1, BACKBONES["clip"].size))


def test_a_layout_setting_never_moves_the_default_layer(models: dict, seed: int) -> None:
    """feature_layout=nchw moved a ViT's default to its patch embedding and timm's Swin's (channels-last
    `norm`) to the attention probabilities of its last block, (B, heads, N, N), explained with exit 0."""
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64).eval()
    for model, size, moved in ((models["clip"], BACKBONES["clip"].size, "patch_embed.proj"), (swin, 64, "attn_drop")):
        with pytest.raises(ExplanationError, match=r"feature_layout='nchw' does not fit the model's default target "
                                                   rf"layer, \S+, and would move it to \S*{moved}: leave feature_layout"):
            SFAM(model, feature_layout="nchw").explain(*pairs(1, size))
    assert SFAM(swin, feature_layout="nhwc").explain(*pairs(1, 64)).map_query.shape == (1, 2, 2)  # its own reading


@pytest.mark.parametrize("name", ["clip", "dinov2_reg4"])
def test_settings_that_contradict_the_model_are_refused(name: str, models: dict, seed: int) -> None:
    """A wrong prefix_tokens would move the default layer onto the patch embedding; an embedding_layer
    that outputs tokens is named with its shape."""
    model = models[name]
    with pytest.raises(ExplanationError, match=f"prefix_tokens=0 contradicts the model's own num_prefix_tokens="
                                               f"{model.num_prefix_tokens}"):
        SFAM(model, prefix_tokens=0)
    with pytest.raises(ExplanationError, match=r"embedding_layer='norm' outputs \(\d+, \d+, 64\), not a \(B, D\)"):
        SFAM(model, embedding_layer="norm").explain(*pairs(1, BACKBONES[name].size))


class Wrapped(nn.Module):
    """A timm ViT inside a user's own module, with a projection head."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit, self.proj = vit, nn.Linear(64, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vit(images))


def test_wrong_prefix_tokens_are_refused_not_worked_around(models: dict, vit_b_16: nn.Module, seed: int) -> None:
    """A wrapped timm ViT keeps its num_prefix_tokens below the top; a ViT without one (torchvision's)
    with a count that fits none of its token outputs: both refused, where the default target layer
    used to move silently to the patch embedding."""
    wrapped = Wrapped(models["dinov2_reg4"]).eval()
    with pytest.raises(ExplanationError, match="prefix_tokens=1 contradicts the model's own num_prefix_tokens=5"):
        SFAM(wrapped, prefix_tokens=1)
    assert SFAM(wrapped).explain(*pairs(1, 56)).map_query.shape == (1, 4, 4)
    with pytest.raises(ExplanationError, match=r"prefix_tokens=0, but none of the model's token outputs"):
        SFAM(vit_b_16, prefix_tokens=0).explain(*pairs(1, 224))
    # a model without token outputs: a prefix_tokens from a shared config changes nothing
    assert SFAM(models["swin_t"], prefix_tokens=0).explain(*pairs(1, 64)).map_query.shape == (1, 2, 2)


def test_channels_last_target_explicit(models: dict, seed: int) -> None:
    """Swin's `features` output (N, h, w, C) is detected as channels-last and explained there."""
    explainer = SFAM(models["swin_t"], "features")
    result = explainer.explain(*pairs(2, 64))
    assert explainer.layout.kind == "nhwc" and result.map_query.shape == (2, 2, 2)
    assert explainer.is_affine is False  # per-token LayerNorm before the pooling: generic path


class AttentionPooledNet(nn.Module):
    """Conv trunk (16 channels at 1/4 of 32 px) -> CLIP ResNet's attention pooling, with separate
    query, key and value projections."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = AttentionPool2d(16, feat_size=8, out_features=8, head_dim=8, qkv_separate=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(images))


@pytest.mark.parametrize("weighting", ["cis", "matched"])
def test_attention_pooling_is_explained_from_the_grid_that_enters_it(weighting: str, seed: int) -> None:
    """The default is the trunk, not a projection inside the pooling head; its keys reach the
    embedding only through the attention weights, which are held: named (before: a RuntimeError
    from autograd, and the default was the queries)."""
    model, (x, y) = AttentionPooledNet().eval(), pairs(2, 32)
    explainer = SFAM(model, weighting=weighting)
    result = explainer.explain(x, y)
    assert explainer.target_layer == "trunk" and result.map_query.shape == (2, 8, 8)
    assert result.cis_query.abs().sum() > 0
    SFAM(model, "pool.v", weighting=weighting).explain(x, y)  # values: explained
    for frozen in (False, True):  # an inference checkpoint's parameters need no gradient: no graph at all
        model.requires_grad_(not frozen)
        with pytest.raises(ExplanationError, match=r"^target_layer='pool.k' reaches the embedding only through what "
                                                   r"is held while attributing \(attention queries and keys"):
            SFAM(model, "pool.k", weighting=weighting).explain(x, y)
