"""build_explainer: the model is checked once, before any explanation."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.models.explainer import build_explainer
from pipeline.models.loading import ModelLoadError, build_model
from pipeline.models.spec import ModelSpec


def test_weights_that_give_no_finite_embedding_are_named(tmp_path) -> None:
    """A checkpoint with a negative BatchNorm variance (noise added to a state_dict) embeds
    everything as NaN: said as such, not as a target-layer problem."""
    spec = ModelSpec(arch="resnet18", embedding_dim=8, input_size=64, target_layer="layer4")
    state = build_model(spec).state_dict()
    state["bn1.running_var"] = -torch.rand_like(state["bn1.running_var"]) - 0.1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "noisy.pt").write_bytes(buffer.getvalue())
    broken = spec.model_copy(update={"weights": str(tmp_path / "noisy.pt")})
    with pytest.raises(ModelLoadError, match=r"embedding of a check picture is not finite .* check the weights .*noisy.pt"):
        build_explainer(broken, device=torch.device("cpu"))
    build_explainer(spec, device=torch.device("cpu"))  # the same model with its own weights is fine
