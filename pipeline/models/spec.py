"""The model section of the job config."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PositiveFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.io.storage import without_credentials

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the names pipeline.explain takes, repeated here so that the config needs no torch (a test checks they agree)
Metric = Literal["cosine", "dot", "euclidean"]
Weighting = Literal["cis", "partner", "matched"]
LayoutName = Literal["auto", "nchw", "nhwc", "tokens"]

TIMM_PREFIX = "timm/"
MIN_INPUT_SIDE = 16  # px
MAX_INPUT_SIDE = 4096  # px: retrieval models take 112 to 1024; a check picture of 100,000 px a side would need 120 GB
_FACTORY_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def model_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a model input size given as one side (square) or as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ModelSpec(BaseModel):
    """Which model to explain and how to feed it.

    `arch` is a torchvision classification model name (`resnet50`), `timm/<name>`
    (a timm model, e.g. `timm/vit_base_patch16_clip_224`; never downloaded: the
    weights come from `weights`) or `package.module:factory`, a function taking no
    arguments that returns an `nn.Module`. For torchvision and timm archs the
    classifier is replaced by `Linear(K, embedding_dim)`, or removed (the model
    outputs its pooled features) when `embedding_dim` is null; factory models are
    used as they are. `weights` is a torch state_dict or a `.safetensors` file;
    `weights_sha256` pins it (the job pins it for its replicas, to the file it checked).

    `feature_layout` says how the target layer's output holds its grid: `auto`
    (detected from the input size), `nchw`, `nhwc` (channels last) or `tokens`
    (B, P + h*w, C); `prefix_tokens` is P, the class / register tokens before the
    patch grid (default: the model's own count, or what fits the input size).
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(min_length=1)
    weights: str | None = None
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # when given, other weights are refused
    embedding_dim: int | None = Field(default=None, ge=1)
    embedding_layer: str | None = None
    target_layer: str | None = None
    metric: Metric = "cosine"
    weighting: Weighting = "cis"
    feature_layout: LayoutName = "auto"
    prefix_tokens: int | None = Field(default=None, ge=0)
    input_size: int | tuple[int, int] = 224  # px: one side (square), or [height, width] (re-ID's 256 x 128)
    mean: tuple[FiniteFloat, FiniteFloat, FiniteFloat] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    trust_checkpoint: bool = False

    @property
    def is_factory(self) -> bool:
        """True when `arch` names a user factory rather than a torchvision or timm model."""
        return ":" in self.arch

    @property
    def timm_name(self) -> str | None:
        """The timm model name of a `timm/<name>` arch, else None."""
        return self.arch.removeprefix(TIMM_PREFIX) if self.arch.startswith(TIMM_PREFIX) else None

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the pictures the model sees."""
        return model_hw(self.input_size)

    @property
    def input_text(self) -> str:
        """The input size as people write it: `224 x 224 px`."""
        return "{} x {} px".format(*self.input_hw)

    @field_validator("weights")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return value if value is None else without_credentials(value)

    @field_validator("weights_sha256", mode="before")
    @classmethod
    def _lower_case_digest(cls, value: object) -> object:
        """A digest as sha256sum prints it, in capitals as Windows' Get-FileHash does, or as sha256:<hex>."""
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads a digest of digits only as a number
            raise ValueError("a digest of digits only reads as a number: quote it ('0123...')")
        return value.strip().lower().removeprefix("sha256:") if isinstance(value, str) else value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_value_for_every_channel(cls, value: object) -> object:
        """A single number (SigLIP's 0.5) stands for all three channels; else three, one per channel."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (value,) * 3
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise ValueError(f"three numbers (red, green, blue), or one for all three; got {value!r}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _for_pixels_from_0_to_1(cls, value: tuple[float, float, float], info: ValidationInfo) -> tuple[float, float, float]:
        """A mean above 1, or a std above 10, is not of pixels from 0 to 1 (a std of 2 only scales them down)."""
        if any(abs(channel) > (1 if info.field_name == "mean" else 10) for channel in value):
            raise ValueError(f"{list(value)} is on the 0-255 scale: images are read as pixels from 0 to 1, so "
                             f"divide by 255 ({[round(channel / 255, 3) for channel in value]})")
        return value

    @field_validator("input_size")
    @classmethod
    def _sides_in_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if not MIN_INPUT_SIDE <= min(model_hw(value)) <= max(model_hw(value)) <= MAX_INPUT_SIDE:
            raise ValueError(f"each side must be from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE} px")
        return value

    @property
    def model_id(self) -> str:
        """Readable id: `resnet50`, `resnet50+fc512`, or the factory path."""
        if self.embedding_dim is None:
            return self.arch
        return f"{self.arch}+fc{self.embedding_dim}"

    @model_validator(mode="after")
    def _check_arch(self) -> ModelSpec:
        if self.is_factory:
            if not _FACTORY_PATH.match(self.arch):
                raise ValueError(f"arch {self.arch!r} is not of the form 'package.module:factory'")
            if self.embedding_dim is not None:
                raise ValueError(
                    "embedding_dim applies only to torchvision and timm archs; "
                    "a factory model is used as it is, so build its head in the factory"
                )
        if self.timm_name == "":
            raise ValueError(f"arch {self.arch!r} names no timm model; write 'timm/<model name>'")
        if self.weights_sha256 is not None and self.weights is None:
            raise ValueError("weights_sha256 pins a weights file, but model.weights is not set: name the file, "
                             "or remove weights_sha256 to explain the random initialisation")
        return self
