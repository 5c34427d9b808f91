import json

import pytest
import torch

from jobs import train_demo_model
from pipeline.demo.model import EMBEDDING_LAYER, TARGET_LAYER, DemoEmbeddingNet, demo_model

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def test_model_structure_after_target_layer_is_pool_flatten_fc():
    model = DemoEmbeddingNet().eval()
    names = [name for name, _ in model.named_children()]
    assert names == ["features", "pool", "flatten", "fc"]
    assert TARGET_LAYER == "features.block4" and EMBEDDING_LAYER == "fc"
    modules = dict(model.named_modules())
    feats = {}
    modules[TARGET_LAYER].register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    with torch.no_grad():
        z = model(torch.randn(2, 3, 64, 64))
    assert feats["a"].shape == (2, 128, 16, 16)
    assert z.shape == (2, 64) and torch.allclose(z.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        u = model.fc(feats["a"].mean((2, 3)))
    assert torch.allclose(z, torch.nn.functional.normalize(u, dim=1), atol=1e-6)


def test_short_training_run_learns_and_writes_a_loadable_checkpoint(tmp_path):
    card = train_demo_model.main(
        ["--steps", "150", "--classes-per-batch", "5", "--samples-per-class", "8", "--eval-size", "200", "--out-dir", str(tmp_path)]
    )
    training = card["training"]
    assert training["loss_last10"] < 0.9 * training["loss_first10"]
    assert card["evaluation"]["recall_at_1"] > 0.3
    assert json.loads((tmp_path / "demo_model.json").read_text()) == card
    state = torch.load(tmp_path / "demo_model.pt", weights_only=True)
    model = DemoEmbeddingNet()
    model.load_state_dict(state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_shipped_checkpoint_loads_and_still_retrieves():
    card = json.loads((train_demo_model.DEFAULT_OUT_DIR / "demo_model.json").read_text())
    assert card["evaluation"]["recall_at_1"] >= 0.9
    assert card["evaluation"]["queries"] >= 1000 and card["evaluation"]["gallery"] >= 1000
    assert (train_demo_model.DEFAULT_OUT_DIR / "demo_model.pt").stat().st_size <= 2 * 2**20
    model = demo_model()
    assert not model.training
    torch.set_num_threads(2)
    assert train_demo_model.recall_at_1(model, 300, seed=12345) > 0.8
