"""Feature layouts: a target layer's output as the (B, C, h, w) map the math works on, and back.

A layer may output a map (B, C, h, w), a channels-last map (B, h, w, C) (Swin, ConvNeXt
blocks) or tokens (B, N, C) whose first P are prefix tokens (class, distillation, register
tokens) followed by an h x w patch grid in row-major order (ViT, CLIP, DINOv2). The patch
grid is what maps are drawn on, and GAP is the mean over the patch tokens only.

The layout is detected from the output's shape and the input image size where that is
unambiguous; `layout=` and `prefix_tokens=` settle it where it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from pipeline.explain.layers import ExplanationError, check_choice

LayoutName = Literal["auto", "nchw", "nhwc", "tokens"]
LAYOUTS: tuple[str, ...] = get_args(LayoutName)


@dataclass(frozen=True)
class FeatureLayout:
    """How one layer's output holds an h x w grid of C-channel features."""

    kind: Literal["nchw", "nhwc", "tokens"]
    height: int
    width: int
    prefix: int = 0  # tokens before the patch grid; "tokens" only

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output -> (B, C, h, w) maps of its patch grid (a view where possible)."""
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        patches = output[:, self.prefix:]  # (B, h*w, C)
        return patches.transpose(1, 2).unflatten(2, (self.height, self.width))

    def from_maps(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """(M, C, h, w) maps -> the layer's layout; prefix tokens are taken from `output`
        (its first row is repeated when M differs from its batch)."""
        if self.kind == "nchw":
            return maps
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1)
        prefix = output[:, : self.prefix]  # (B, P, C)
        if prefix.shape[0] != maps.shape[0]:
            prefix = prefix[:1].expand(maps.shape[0], -1, -1)
        return torch.cat([prefix, maps.flatten(2).transpose(1, 2)], dim=1)

    @property
    def grid(self) -> int:
        return self.height * self.width


def detect_layout(
    shape: torch.Size, image_size: tuple[int, int], layout: LayoutName = "auto",
    prefix_tokens: int | None = None, prefix_hint: int | None = None, strict: bool = False,
) -> FeatureLayout:
    """The layout of an output of `shape` for input images of `image_size` (H, W).

    layout: "auto" detects it; 4-D outputs are (B, C, h, w) unless only (B, h, w, C) fits the
        input's aspect ratio and stride. prefix_tokens fixes P for token outputs; prefix_hint
        (the model's own count, e.g. timm's `num_prefix_tokens`) is tried first otherwise.
    strict: a set layout must also read a grid of the image at one stride (the default layer's
        search); a layer that is named may have a grid that no stride gives (unpadded convolutions).
    Raises ExplanationError naming the settings to use when the shape does not fit.
    """
    check_choice("feature_layout", layout, LAYOUTS)
    dims = tuple(shape[1:])
    if len(dims) == 3 and layout in ("auto", "nchw", "nhwc"):
        fits = {kind: _fits_grid(hw, image_size) for kind, hw in (("nchw", dims[1:]), ("nhwc", dims[:2]))}
        if layout != "auto" and not fits[layout]:
            _check_set_grid(layout, fits, tuple(shape), image_size, strict)
        kind = layout if layout != "auto" else next((k for k in ("nchw", "nhwc") if fits[k]), None)
        if kind is None:
            raise ExplanationError(
                f"cannot tell the layout of a {tuple(shape)} output for {image_size[0]}x{image_size[1]} "
                "input: neither (B, C, h, w) nor (B, h, w, C) is a grid of the image; set feature_layout"
            )
        height, width = dims[1:] if kind == "nchw" else dims[:2]
        return FeatureLayout(kind, height, width)
    if len(dims) == 2 and layout in ("auto", "tokens"):
        return _token_layout(dims[0], image_size, prefix_tokens, prefix_hint, tuple(shape))
    if len(dims) == 2:
        raise ExplanationError(f"feature_layout={layout!r} does not fit a {tuple(shape)} output, which is tokens "
                               "(B, N, C): set feature_layout tokens, or auto")
    if len(dims) == 3:
        raise ExplanationError(f"feature_layout={layout!r} does not fit a {tuple(shape)} output, which is a map "
                               "(B, C, h, w) or (B, h, w, C): set feature_layout nchw or nhwc, or auto")
    raise ExplanationError(
        f"a {tuple(shape)} output is not a feature map: expected (B, C, h, w), (B, h, w, C) or tokens (B, N, C)"
    )


def _check_set_grid(layout: str, fits: dict[str, bool], shape: tuple[int, ...], image_size: tuple[int, int],
                    strict: bool) -> None:
    """A set 4-D layout whose grid is not the image at one stride: refused where the other layout's is
    (the setting is wrong), where the grid is larger than the image, or when `strict`. Kept otherwise:
    a named layer may have a grid that no stride gives (unpadded convolutions)."""
    other = "nhwc" if layout == "nchw" else "nchw"
    height, width = shape[2:] if layout == "nchw" else shape[1:3]
    if not (strict or fits[other] or height > image_size[0] or width > image_size[1]):
        return
    advice = (f"the output is a grid of the image read as {other}: set feature_layout {other}, or auto" if fits[other]
              else "leave feature_layout to auto, or name a target_layer that outputs such a grid")
    raise ExplanationError(f"feature_layout={layout!r} reads a {shape} output as a {height}x{width} grid, which is "
                           f"not the {image_size[0]}x{image_size[1]} input seen at one stride: {advice}")


def _fits_grid(grid: tuple[int, ...], image_size: tuple[int, int]) -> bool:
    """True when an h x w grid is the image seen with one integer stride s (H/s rounded either way)."""
    (height, width), (image_height, image_width) = grid, image_size
    if not (1 <= height <= image_height and 1 <= width <= image_width):
        return False
    strides = {max(1, image_height // height), -(-image_height // height)}
    return any(
        height in (image_height // s, -(-image_height // s)) and width in (image_width // s, -(-image_width // s))
        for s in strides
    )


def _patch_grid(patches: int, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) when `patches` tokens tile the image with a square integer patch size, else None."""
    if patches < 1:
        return None
    stride = math.isqrt(image_size[0] * image_size[1] // patches)
    for s in (stride, stride + 1):
        divides = s >= 1 and image_size[0] % s == 0 and image_size[1] % s == 0
        if divides and (image_size[0] // s) * (image_size[1] // s) == patches:
            return image_size[0] // s, image_size[1] // s
    return None


def _token_layout(
    tokens: int, image_size: tuple[int, int], prefix_tokens: int | None, prefix_hint: int | None,
    shape: tuple[int, ...],
) -> FeatureLayout:
    if prefix_tokens is not None:
        grid = _patch_grid(tokens - prefix_tokens, image_size)
        if grid is None:
            raise ExplanationError(
                f"{tokens - prefix_tokens} tokens after prefix_tokens={prefix_tokens} of a {shape} output "
                f"are not a patch grid of {image_size[0]}x{image_size[1]} input"
            )
        return FeatureLayout("tokens", *grid, prefix=prefix_tokens)
    if prefix_hint is not None and (grid := _patch_grid(tokens - prefix_hint, image_size)) is not None:
        return FeatureLayout("tokens", *grid, prefix=prefix_hint)
    for prefix in range(tokens):  # fewest prefix tokens first; they never outnumber the patches
        grid = _patch_grid(tokens - prefix, image_size)
        if grid is not None and prefix < grid[0] * grid[1]:
            return FeatureLayout("tokens", *grid, prefix=prefix)
    raise ExplanationError(
        f"cannot find a patch grid in a {shape} token output for {image_size[0]}x{image_size[1]} "
        "input; set prefix_tokens (the class / register tokens before the patches)"
    )
