"""The demo ViT: CLIP / DINOv2-style structure, the explainer's default layer, its training recipe
and the shipped checkpoint."""

import json

import pytest
import safetensors.torch
import torch

from jobs import train_demo_model
from pipeline import SFAM
from pipeline.demo import vit
from pipeline.models.loading import build_model
from pipeline.models.spec import ModelSpec

CARD = train_demo_model.DEFAULT_OUT_DIR / train_demo_model.RECIPES["vit"].card


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def test_class_token_vit_with_final_norm_and_projection():
    model = vit.build_vit().eval()
    assert model.num_prefix_tokens == 1 and model.global_pool == "token"
    assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.head, torch.nn.Linear)
    seen = {}
    model.get_submodule(vit.TARGET_LAYER).register_forward_hook(lambda _m, _i, out: seen.setdefault("tokens", out))
    with torch.no_grad():
        z = model(torch.randn(2, 3, vit.INPUT_SIZE, vit.INPUT_SIZE))
    assert seen["tokens"].shape == (2, 1 + vit.PATCH_GRID_SIDE**2, vit.WIDTH)
    assert z.shape == (2, vit.EMBEDDING_DIM) and not torch.allclose(z.norm(dim=1), torch.ones(2))


def test_explainer_defaults_to_the_tokens_entering_the_first_block():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, vit.INPUT_SIZE, vit.INPUT_SIZE), torch.randn(2, 3, vit.INPUT_SIZE, vit.INPUT_SIZE)
    explainer = SFAM(vit.demo_vit())
    result = explainer.explain(x, y)
    assert explainer.target_layer == vit.TARGET_LAYER == "pos_drop"
    assert result.map_query.shape == (2, vit.PATCH_GRID_SIDE, vit.PATCH_GRID_SIDE)
    torch.testing.assert_close(result.cis_query.sum(dim=1) + result.residual_query, result.similarity)


def test_short_vit_training_run_writes_safetensors_and_a_card(tmp_path):
    card = train_demo_model.main(["--model", "vit", "--steps", "4", "--classes-per-batch", "4", "--samples-per-class", "2",
                                  "--eval-size", "40", "--out-dir", str(tmp_path)])
    assert card["model"] == "pipeline.demo.vit:demo_vit"
    assert "proxy" in card["training"]["loss"] and card["training"]["grad_clip"] == 1.0
    assert set(card["evaluation"]["embedding_spread"]) == {"mean_cosine_same_class", "mean_cosine_other_classes"}
    assert json.loads((tmp_path / "demo_vit.json").read_text()) == card
    vit.build_vit().load_state_dict(safetensors.torch.load_file(tmp_path / vit.CHECKPOINT))


def test_shipped_vit_retrieves():
    card = json.loads(CARD.read_text())
    assert card["evaluation"]["recall_at_1"] >= 0.8
    spread = card["evaluation"]["embedding_spread"]
    assert spread["mean_cosine_other_classes"] < spread["mean_cosine_same_class"] - 0.3  # not collapsed


def test_shipped_vit_loads_through_a_model_spec():
    card = json.loads(CARD.read_text())
    assert card["evaluation"]["queries"] >= 1000 and card["evaluation"]["gallery"] >= 1000
    checkpoint = train_demo_model.DEFAULT_OUT_DIR / vit.CHECKPOINT
    assert checkpoint.stat().st_size == card["checkpoint"]["bytes"] <= 5 * 2**20
    model = build_model(ModelSpec(arch=card["model"], input_size=vit.INPUT_SIZE))
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, vit.INPUT_SIZE, vit.INPUT_SIZE)).shape == (1, vit.EMBEDDING_DIM)
