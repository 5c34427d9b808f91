"""What the linearised head holds: with every bias and additive constant of a model set to 0,
its head with statistics and gates held is linear in the target features, so the channels
must explain the whole similarity (residual 0) while the similarity stays the model's own."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, QuickGELU, RmsNorm, SqueezeExcite, StdConv2d
from torch import nn

from pipeline import SFAM, ExplanationError
from pipeline.explain.linearise import Linearised
from pipeline.explain.metrics import similarity

from reference import SmallNet, assert_close


class ChannelsLast(nn.Module):
    """Applies a per-token module to (N, C, h, w) features as (N, h, w, C)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class KeywordAttention(nn.Module):
    """Self-attention over the positions that passes queries and keys to SDPA by name."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (N, h*w, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(query=q, key=k, value=v)
        return out.transpose(1, 2).reshape(x.shape)


HELD = {  # operation after the target layer: the module that applies it to (N, 16, h, w)
    "group_norm": lambda: nn.GroupNorm(4, 16),
    "instance_norm": lambda: nn.InstanceNorm2d(16, affine=True),
    "rms_norm": lambda: ChannelsLast(nn.RMSNorm(16)),
    "timm_rms_norm": lambda: ChannelsLast(RmsNorm(16)),  # hand-written: x * rsqrt(mean(x^2) + eps)
    "sigmoid_gate": lambda: SqueezeExcite(16, rd_ratio=0.5),  # x * sigmoid(fc(relu(fc(GAP(x)))))
    "hard_sigmoid_gate": lambda: SqueezeExcite(16, rd_ratio=0.5, gate_layer="hard_sigmoid"),
    "quick_gelu": QuickGELU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "silu": nn.SiLU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "attention_by_keyword": lambda: KeywordAttention(16),
}


class HeldOpNet(nn.Module):
    """Conv trunk ("features", 16 channels at 1/2 resolution) -> `op` -> ReLU -> 1x1 conv -> GAP -> Linear
    (the ReLU keeps what a normalisation centres from averaging out to 0)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.op = op
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mix(self.op(self.features(images)).relu()).mean(dim=(2, 3)))


def without_constants(model: nn.Module) -> nn.Module:
    """Random weights, every bias, BatchNorm running mean and learned token / position vector 0."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "token" in name or "pos_embed" in name:
                parameter.zero_()
            elif parameter.dim() == 1:  # norm scales, layer scales: away from their initial 1
                parameter.uniform_(0.5, 1.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def assert_complete(model: nn.Module, target_layer: str, size: int, metric: str) -> None:
    """In float64 (the results are rounded to float32), where a gate left free (its derivative is small at random initialisation:
    1e-5 of the contributions in efficientnet_b0) is not lost in float32's rounding."""
    model = model.double()
    x, y = torch.randn(3, 3, size, size, dtype=torch.float64), torch.randn(3, 3, size, size, dtype=torch.float64)
    result = SFAM(model, target_layer, metric=metric).explain(x, y)
    with torch.no_grad():
        own = similarity(metric, model(x).double(), model(y).double())
    assert_close(result.similarity, own, rel=1e-6, what="similarity", scale=own.abs().max())
    for side in ("query", "reference"):
        cis = getattr(result, f"cis_{side}").double()
        assert cis.abs().sum() > 0
        assert_close(cis.sum(dim=1), result.similarity, rel=1e-6, what=f"sum of CIS ({side})", scale=cis.abs().sum(dim=1).max())


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("name", list(HELD))
def test_each_held_operation_leaves_no_residual_without_constants(name: str, metric: str, seed: int) -> None:
    assert_complete(without_constants(HeldOpNet(HELD[name]())), "features", 16, metric)


TIMM = {  # model: (settings, target layer, input size); the held operations after the target
    # QuickGELU MLPs, LayerNorms, attention (OpenAI CLIP)
    "vit_base_patch16_clip_quickgelu_224": ({"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}, "pos_drop", 32),
    # SiLU, squeeze-and-excitation sigmoid gates, BatchNorm
    "efficientnet_b0": ({}, "blocks.4", 64),
    # hard swish, hard-sigmoid gates
    "mobilenetv3_small_100": ({}, "blocks.3", 64),
    # GroupNorm after every weight-standardised convolution
    "resnetv2_18": ({"norm_layer": GroupNormAct, "conv_layer": StdConv2d}, "stages.2", 64),
    # rotary position embeddings and SwiGLU MLPs, silu(x W) * (x V): the uniform rule (EVA-02; 0.9 % missed before)
    "eva02_tiny_patch14_224": ({"img_size": 56, "depth": 2}, "pos_drop", 56),
    # global response normalisation (ConvNeXt V2)
    "convnextv2_atto": ({}, "stages.2", 64),
    # class and distillation tokens, averaged by the head (DeiT)
    "deit_tiny_distilled_patch16_224": ({"img_size": 64, "depth": 2}, "pos_drop", 64),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_backbones_leave_no_residual_without_constants(name: str, seed: int) -> None:
    settings, target_layer, size = TIMM[name]
    model = timm.create_model(name, pretrained=False, num_classes=0, **settings)
    assert_complete(without_constants(model), target_layer, size, "cosine")


def test_a_sigmoid_that_gates_nothing_keeps_its_gradient(seed: int) -> None:
    """Only a sigmoid that multiplies something is held; one on the output used to leave the
    embedding without any gradient (a crash)."""
    model = SmallNet(nn.Sequential(nn.Linear(16, 8), nn.Sigmoid())).eval()  # a sigmoid that squashes the embedding
    x, y = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    result = SFAM(model, "features", metric="dot", fast_path=False).explain(x, y)
    assert result.cis_query.abs().sum() > 0
    with torch.no_grad():
        assert_close(result.similarity, similarity("dot", model(x).double(), model(y).double()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_without_eps_keeps_its_values_in_16_bits(dtype: torch.dtype, seed: int) -> None:
    """F.rms_norm's default eps is float32's machine epsilon for 16-bit inputs, not theirs (1e-3 in
    float16 outweighs the mean square of small features)."""
    x = (torch.randn(4, 8) * 1e-2).to(dtype)
    with Linearised() as mode:
        mode.active = True
        held = F.rms_norm(x, [8])
    assert_close(held, F.rms_norm(x, [8]), rel=2e-2)


class RsqrtNormalise(nn.Module):
    """L2 normalisation written with rsqrt: a held rsqrt makes the head look affine."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * torch.rsqrt(u.pow(2).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_l2_normalised_output_is_refused_on_both_paths(fast_path: bool, seed: int) -> None:
    with pytest.raises(ExplanationError, match="scale invariant"):
        model = SmallNet(nn.Sequential(nn.Linear(16, 8, bias=False), RsqrtNormalise())).eval()
        SFAM(model, "features", fast_path=fast_path).explain(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))


class NormUses(nn.Module):
    """After `features` (N, 16, h, w): a norm used as a value (L2 pooling) and, held where it
    multiplies, a global response normalisation's x * |x| / mean |x| after a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(32, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.mix(self.features(images)))
        spatial = x.norm(p=2, dim=(2, 3), keepdim=True)
        responded = x * (spatial / (spatial.mean(dim=1, keepdim=True) + 1e-6))  # GRN: a product of degree 1
        return self.fc(torch.cat([responded.mean(dim=(2, 3)), torch.linalg.vector_norm(x, dim=(2, 3))], dim=1))


def test_a_norm_is_held_only_where_it_multiplies(seed: int) -> None:
    """A gated unit after a GELU whose other factor is a statistic is not split (GRN lost half its
    share so); a norm used as a value keeps its gradient (L2 pooling was refused so)."""
    assert_complete(without_constants(NormUses()), "features", 16, "cosine")


def test_the_uniform_rule_keeps_16_bit_values(seed: int) -> None:
    """a * b as a b/2 + a b/2: the sum a b + a b before halving overflowed float16 above 32752."""
    mode = Linearised()
    a = torch.full((3,), 200.0, dtype=torch.float16, requires_grad=True).clone()  # a function of the features
    with mode:
        mode.active = True
        gated = F.silu(a)  # a held activation's output times another function of the features
        product = gated * a
    assert torch.equal(product.detach(), F.silu(a.detach()) * a.detach()) and torch.isfinite(product).all()
