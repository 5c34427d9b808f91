"""One way to turn a ModelSpec into a ready explainer: device, model, weights, SFAM, inputs.

`sfam explain`, the job's explain actors and the job's pre-flight check all build theirs here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.explain import SFAM, SFAMResult
from pipeline.explain.layers import parameter_dtype
from pipeline.io.images import to_model_tensor
from pipeline.io.storage import StorageOptions
from pipeline.models.loading import ModelLoadError, load_model, short_reason
from pipeline.models.spec import ModelSpec


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU (decided at run time)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    """Which processor explained a row, e.g. "cuda NVIDIA H100 80GB HBM3 GPU-6f1c…" (the UUID tells GPUs apart)."""
    if device.type != "cuda":
        return device.type
    properties = torch.cuda.get_device_properties(device)
    return f"cuda {properties.name} GPU-{properties.uuid}"


@dataclass
class ModelExplainer:
    """A model replica on its device and the SFAM explainer over it."""

    spec: ModelSpec
    sfam: SFAM
    device: torch.device

    @property
    def target_layer(self) -> str | None:
        """The explained layer: the spec's, or the default chosen at the first explanation."""
        return self.sfam.target_layer

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 model-size pictures -> (N, 3, H, W) normalised float tensor on the device."""
        return to_model_tensor(pixels, self.spec.mean, self.spec.std, self.device)

    def explain_pairs(self, pixels: np.ndarray, query_index: list[int], reference_index: list[int]) -> SFAMResult:
        """Explains pairs of distinct pictures (N, H, W, 3); each index list names a side of each pair."""
        query, reference = (torch.as_tensor(index, device=self.device) for index in (query_index, reference_index))
        with torch.inference_mode():
            return self.sfam.explain_pairs(self.inputs(pixels), query, reference)

    def trial(self) -> SFAMResult:
        """Explains one pair of random pictures: proves the model, its layers and the metric work together."""
        generator = np.random.default_rng(0)
        pixels = generator.integers(0, 256, (2, *self.spec.input_hw, 3), dtype=np.uint8)
        return self.explain_pairs(pixels, [0], [1])


def _check_model_runs(model: torch.nn.Module, spec: ModelSpec, device: torch.device) -> None:
    """One forward of a random picture at input_size. A model built for another size (a torchvision
    ViT at anything but 224 px), or whose weights give no finite embedding (a broken checkpoint),
    is named here, not as a traceback or a misleading layer error of the first explanation."""
    dtype = parameter_dtype(model)
    picture = torch.rand(1, 3, *spec.input_hw, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            embedding = model(picture.to(device, dtype))
    except Exception as error:  # the model's own check, in whatever form it raises
        raise ModelLoadError(f"model {spec.model_id} does not run on a batch of {spec.input_text} RGB pictures "
                             f"(model(x), x of shape (1, 3, h, w)): {short_reason(error)}; {_what_to_change(error)}") from error
    if isinstance(embedding, torch.Tensor) and not bool(torch.isfinite(embedding).all()):
        raise ModelLoadError(f"model {spec.model_id}: the embedding of a check picture is not finite (NaN or inf); "
                             f"check the weights{f' {spec.weights}' if spec.weights else ''}")


def _what_to_change(error: Exception) -> str:
    """The setting or wrapper that a failed check forward points to."""
    channels = re.search(r"to have (\d+) channels, but got 3 channels", str(error))
    if channels:
        return (f"the model takes {channels[1]}-channel pictures and the job gives RGB ones: give a factory that "
                "converts them first (arch: package.module:factory; for grey, forward returns net(x.mean(1, keepdim=True)))")
    if isinstance(error, TypeError) and "required positional argument" in str(error):
        return ("the job calls forward with one batch of pictures: for a siamese or two-input model, give a factory "
                "that returns the branch that embeds one image (arch: package.module:factory)")
    return "set model.input_size to the size the model was built for"


def build_explainer(spec: ModelSpec, storage_options: StorageOptions | None = None,
                    device: torch.device | None = None) -> ModelExplainer:
    """The spec's model with its weights on `device` (default: pick_device()) and its explainer,
    whose spec pins the weights it loaded (`weights_sha256`)."""
    device = device or pick_device()
    model, spec = load_model(spec, storage_options)
    model = model.to(device)
    _check_model_runs(model, spec, device)
    sfam = SFAM(model, spec.target_layer, spec.metric, embedding_layer=spec.embedding_layer, weighting=spec.weighting,
                feature_layout=spec.feature_layout, prefix_tokens=spec.prefix_tokens)
    return ModelExplainer(spec, sfam, device)
