"""The demo's transformer: a small ViT embedding model trained on the same canvases as the CNN.

Built like the retrieval ViTs in use (CLIP, DINOv2): patch embedding, a class token, pre-norm
blocks, a final LayerNorm, the class token pooled and a linear projection to the embedding.
forward() returns the unnormalised embedding, so the explainer needs no `embedding_layer`.
It is timm's `VisionTransformer`, so `model.num_prefix_tokens` tells the explainer that the
first token of each block's output is the class token.
"""

from __future__ import annotations

from importlib import resources

import safetensors.torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.demo.model import INPUT_SIZE

PATCH_SIZE = 8  # an 8 x 8 patch grid at INPUT_SIZE
WIDTH = 96
DEPTH = 4
HEADS = 3
EMBEDDING_DIM = 64
GRID_SIDE = INPUT_SIZE // PATCH_SIZE
TARGET_LAYER = f"blocks.{DEPTH - 2}"  # the input of the last block: what the explainer picks by default
CHECKPOINT = "demo_vit.safetensors"  # in pipeline/assets
ARCHITECTURE = (f"timm VisionTransformer: patch {PATCH_SIZE}, width {WIDTH}, {DEPTH} pre-norm blocks of {HEADS} "
                f"heads, class token, final LayerNorm, class-token pooling, Linear({WIDTH}, {EMBEDDING_DIM}) projection")


def build_vit() -> VisionTransformer:
    """A freshly initialised demo ViT: (B, 3, 64, 64) normalised images -> (B, 64) embeddings."""
    return VisionTransformer(img_size=INPUT_SIZE, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH,
                             num_heads=HEADS, num_classes=EMBEDDING_DIM, global_pool="token", class_token=True)


def demo_vit(pretrained: bool = True) -> VisionTransformer:
    """The demo ViT in eval mode, with the shipped weights unless `pretrained=False`."""
    model = build_vit()
    if pretrained:
        data = (resources.files("pipeline") / "assets" / CHECKPOINT).read_bytes()
        model.load_state_dict(safetensors.torch.load(data))
    return model.eval()
