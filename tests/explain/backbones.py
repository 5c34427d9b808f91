"""Transformer and LayerNorm backbones with random weights, and float64 references of their
linearised heads written independently of pipeline.explain.linearise."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torchvision
from torch import nn


def jittered(model: nn.Module) -> nn.Module:
    """Random non-trivial LayerNorm, layer-scale and token parameters (at init LayerNorms have
    gamma = 1, beta = 0 and DINOv2's layer scale is 1e-5: heads' biases and blocks would vanish)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(getattr(module, "gamma", None), nn.Parameter):  # timm LayerScale
                module.gamma.uniform_(0.5, 1.5)
        for name, parameter in model.named_parameters():
            if "token" in name or "pos_embed" in name:
                parameter.normal_(0, 0.5)
    return model.eval()


def torchvision_backbone(name: str) -> nn.Module:
    """A torchvision model whose classifier is removed (outputs its pooled features)."""
    model = torchvision.models.get_model(name, weights=None)
    head = {"vit_b_16": ("heads", "head"), "swin_t": ("head",), "convnext_tiny": ("classifier", "2")}[name]
    parent = model.get_submodule(".".join(head[:-1])) if len(head) > 1 else model
    setattr(parent, head[-1], nn.Identity())
    return jittered(model)


def timm_vit(name: str, size: int, **settings: object) -> nn.Module:
    """A small random member of a timm ViT family: 3 blocks of width 64 at `size` px."""
    return jittered(timm.create_model(name, pretrained=False, num_classes=0, img_size=size,
                                      depth=3, embed_dim=64, num_heads=2, **settings))


@dataclass
class Backbone:
    make: Callable[[], nn.Module]
    size: int
    default_target: str
    layout: tuple[str, int]  # kind, prefix tokens


BACKBONES: dict[str, Backbone] = {
    "convnext_tiny": Backbone(lambda: torchvision_backbone("convnext_tiny"), 64, "features", ("nchw", 0)),
    "swin_t": Backbone(lambda: torchvision_backbone("swin_t"), 64, "permute", ("nchw", 0)),
    "clip": Backbone(lambda: timm_vit("vit_base_patch16_clip_224", 64), 64, "pos_drop", ("tokens", 1)),
    "dinov2_reg4": Backbone(lambda: timm_vit("vit_small_patch14_reg4_dinov2", 56), 56, "pos_drop", ("tokens", 5)),
    # SigLIP: attention pooling with a learned query (no class token): the grid entering it, `norm`
    "siglip": Backbone(lambda: timm_vit("vit_base_patch16_siglip_224", 64), 64, "norm", ("tokens", 0)),
    # mean pooling, then LayerNorm (fc_norm): the tokens entering the first block, as with a class token
    "mean_pooled": Backbone(lambda: timm_vit("vit_medium_patch16_gap_256", 64, fc_norm=True), 64, "pos_drop", ("tokens", 0)),
}


def _frozen_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    deviation = (centred.pow(2).mean(dim=-1, keepdim=True) + norm.eps).sqrt().detach()
    return centred / deviation * norm.weight + norm.bias


def _frozen_timm_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT block with LayerNorm deviations, softmax weights and GELU gates held."""
    batch, tokens, channels = x.shape
    attention = block.attn
    heads = attention.num_heads
    q, k, v = attention.qkv(_frozen_layer_norm(block.norm1, x)).reshape(
        batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * attention.scale).softmax(dim=-1).detach()
    x = x + block.ls1(attention.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels)))
    hidden = block.mlp.fc1(_frozen_layer_norm(block.norm2, x))
    hidden = hidden * (0.5 * (1 + torch.erf(hidden / math.sqrt(2)))).detach()
    return x + block.ls2(block.mlp.fc2(hidden))


def timm_vit_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Input of the last block (N, P + h*w, C) -> class-token embedding (N, C), linearised."""
    return _frozen_layer_norm(model.norm, _frozen_timm_block(model.blocks[-1], tokens))[:, 0]


def _through_blocks(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block (N, P + h*w, C) -> the last block's output, linearised: CLIP's
    pre-norm (a LayerNorm, deviation held; an Identity elsewhere) and every block."""
    if isinstance(model.norm_pre, nn.LayerNorm):
        tokens = _frozen_layer_norm(model.norm_pre, tokens)
    for block in model.blocks:
        tokens = _frozen_timm_block(block, tokens)
    return tokens


def timm_vit_entry_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block, `pos_drop` (N, P + h*w, C) -> class-token embedding (N, C)."""
    return _frozen_layer_norm(model.norm, _through_blocks(model, tokens))[:, 0]


def attention_pooled_vit_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """SigLIP from `norm` (N, h*w, C): the learned query attends to the tokens (softmax held), then
    projection and MLP (its LayerNorm deviation and GELU held) -> the pooled token (N, C)."""
    pool = model.attn_pool
    batch, tokens_, channels = tokens.shape
    heads = pool.num_heads
    q = pool.q(pool.latent).reshape(1, 1, heads, channels // heads).transpose(1, 2)  # (1, heads, 1, C/heads)
    k, v = pool.kv(tokens).reshape(batch, tokens_, 2, heads, channels // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * pool.scale).softmax(dim=-1).detach()  # (N, heads, 1, h*w)
    x = pool.proj((weights @ v).transpose(1, 2).reshape(batch, 1, channels))
    hidden = pool.mlp.fc1(_frozen_layer_norm(pool.norm, x))
    hidden = hidden * (0.5 * (1 + torch.erf(hidden / math.sqrt(2)))).detach()
    return (x + pool.mlp.fc2(hidden))[:, 0]


def mean_pooled_vit_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Output of the blocks (N, h*w, C) -> mean over the tokens -> LayerNorm (deviation held)."""
    return _frozen_layer_norm(model.fc_norm, tokens.mean(dim=1))


def mean_pooled_vit_entry_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block, `pos_drop` (N, h*w, C) -> every block -> mean_pooled_vit_head."""
    return mean_pooled_vit_head(model, _through_blocks(model, tokens))


def convnext_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """torchvision ConvNeXt: GAP -> LayerNorm2d (deviation held) -> Flatten."""
    pooled = features.mean(dim=(2, 3))
    return _frozen_layer_norm(model.classifier[0], pooled)


def swin_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """torchvision Swin from `features` (N, h, w, C): per-token LayerNorm (held) -> mean."""
    return _frozen_layer_norm(model.norm, features).mean(dim=(1, 2))
