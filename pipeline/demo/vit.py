"""The demo's transformer: a small ViT embedding model trained on the same canvases as the CNN.

Built like the retrieval ViTs in use (CLIP, DINOv2): 8 x 8 px patches as tokens, a class
token, pre-norm blocks, a final LayerNorm, the class token pooled and a linear projection to
the embedding. forward() returns the unnormalised embedding, so the explainer needs no
`embedding_layer`. It is timm's `VisionTransformer`, so `model.num_prefix_tokens` tells the
explainer that the first token of each block's output is the class token.

One change from a plain ViT: the patch projection is a small convolutional stem with the
same 8 px stride (Xiao et al., "Early convolutions help transformers see better", NeurIPS
2021). With a linear 8 x 8 projection the model stayed near a constant embedding for the first
few hundred steps (Recall@1 0.18 after 200 steps, mean cosine 0.95 between different digits);
the blocks, tokens and head are untouched. The shipped weights: 1,500 steps of the demo recipe
with a classification proxy and the CNN as teacher (jobs/train_demo_model.py), held-out
Recall@1 0.977 (pipeline/assets/demo_vit.json).
"""

from __future__ import annotations

from importlib import resources

import safetensors.torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.demo.model import INPUT_SIZE

PATCH_SIZE = 8  # an 8 x 8 patch grid at INPUT_SIZE
WIDTH = 96
DEPTH = 4
HEADS = 3
EMBEDDING_DIM = 64
STEM = (24, 48)  # channels of the stem's stride-2 convolutions before the stride-2 projection to WIDTH
PATCH_GRID_SIDE = INPUT_SIZE // PATCH_SIZE
TARGET_LAYER = "pos_drop"  # the tokens entering the first block: what the explainer picks by default
CHECKPOINT = "demo_vit.safetensors"  # in pipeline/assets
ARCHITECTURE = (f"timm VisionTransformer: {PATCH_SIZE} px patches by a conv stem (conv3x3/2-BN-ReLU {STEM[0]}, "
                f"{STEM[1]}, conv3x3/2 to {WIDTH}), width {WIDTH}, {DEPTH} pre-norm blocks of {HEADS} heads, class "
                f"token, final LayerNorm, class-token pooling, Linear({WIDTH}, {EMBEDDING_DIM}) projection")


def conv_stem() -> nn.Sequential:
    """(B, 3, S, S) -> (B, WIDTH, S/8, S/8): stride-2 3x3 convolutions in place of the 8 x 8 patch projection."""
    layers: list[nn.Module] = []
    channels = 3
    for out in STEM:
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, WIDTH, 3, stride=2, padding=1))


def build_vit(mean_pooled: bool = False) -> VisionTransformer:
    """A freshly initialised demo ViT: (B, 3, 64, 64) normalised images -> (B, 64) embeddings, pooled
    by its class token, or (`mean_pooled`) by the mean of its patch tokens, without a class token."""
    model = VisionTransformer(img_size=INPUT_SIZE, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH,
                              num_heads=HEADS, num_classes=EMBEDDING_DIM, global_pool="avg" if mean_pooled else "token",
                              class_token=not mean_pooled)
    model.patch_embed.proj = conv_stem()
    return model


def demo_vit(pretrained: bool = True) -> VisionTransformer:
    """The demo ViT in eval mode, with the shipped weights unless `pretrained=False`."""
    model = build_vit()
    if pretrained:
        data = (resources.files("pipeline") / "assets" / CHECKPOINT).read_bytes()
        model.load_state_dict(safetensors.torch.load(data))
    return model.eval()
