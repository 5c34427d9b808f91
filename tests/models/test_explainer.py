"""build_explainer: the model is checked once, before any explanation."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.models.explainer import _check_model_runs, build_explainer
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


class TwoInputs(torch.nn.Module):
    """A siamese wrapper whose forward takes both images."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.branch(x1) * self.branch(x2)


@pytest.mark.parametrize(("model", "advice"), [
    (torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
     r"the model takes 1-channel pictures and the job gives RGB ones: give a factory that converts them first"),
    (TwoInputs(), r"missing 1 required positional argument: 'x2'; the job calls forward with one batch of pictures: "
                  "for a siamese or two-input model, give a factory that returns the branch"),
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8)),
     r"mat1 and mat2 shapes cannot be multiplied.*; set model.input_size to the size the model was built for"),
])
def test_a_model_that_fails_its_check_forward_is_told_what_to_change(model: torch.nn.Module, advice: str) -> None:
    """Every failure was put down to model.input_size, a grey model's and a two-input wrapper's too."""
    spec = ModelSpec(arch="my.nets:make", input_size=64)
    with pytest.raises(ModelLoadError, match=r"does not run on a batch of 64 x 64 px RGB pictures .*" + advice):
        _check_model_runs(model.eval(), spec, torch.device("cpu"))
