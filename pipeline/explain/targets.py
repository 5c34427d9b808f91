"""Choosing layers: the default target layer, influence checks, embedding-layer suggestions.

The default target is the last layer, in execution order, whose feature grid influences the
embedding and that runs once per forward pass. With class-token pooling (ViT, CLIP, DINOv2)
the last block's patch tokens never reach the class token, and the class token carries into
every later block what it read from the patches in the earlier ones: explained at the input of
the last block, most of the similarity stays in the class token's own state, outside the patch
grid (a residual of 0.77 of the similarity on the demo ViT). So with class-token pooling the default is the token sequence
entering the first block: the first module whose output holds the prefix tokens before the
patch grid (timm: `pos_drop`; torchvision: `encoder.dropout`), after the position embedding.
There the class token is still the model's constant, and the patch tokens carry the rest
(residual share 0.13 on the demo ViT, and maps that localise better; docs/method.md). The
patch embedding itself, before the class token joins, is never the default. Mean pooling over
the tokens of one stack of blocks after a position embedding defaults to the tokens entering the
first block as well: on a mean-pooled demo ViT the last block's output located the digit in 0.305
of the pairs, the first block's input in 0.990.

Attention pooling (SigLIP's latent query, CLIP ResNet's AttentionPool2d) turns the grid into the
embedding in its own head, whose projections are grids too (keys and values; a query of every
token). The default is the grid that enters that head, the backbone's last features: the keys
reach the embedding only through the attention weights, which are held while attributing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.explain.head import has_unit_norm
from pipeline.explain.layers import ExplanationError
from pipeline.explain.layout import FeatureLayout, detect_layout

# class names of attention-pooling heads (lower case, in part): timm's AttentionPoolLatent and
# AttentionPool2d, open_clip's AttentionalPooler
ATTENTION_POOLING = ("attentionpool", "attentionalpool")
# a grid counts as influential when perturbing it moves the embedding by more than this
# (relative); float32 rounding of an unchanged embedding stays below 1e-6
INFLUENCE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Output:
    """Modules that returned the same tensor, innermost first (a block and its last module)."""

    names: tuple[str, ...]
    tensor: torch.Tensor

    @property
    def name(self) -> str:
        """The outermost module's name, the one shown to users."""
        return self.names[-1]


def module_outputs(model: nn.Module, sample: torch.Tensor) -> list[Output]:
    """Every named module's tensor output on `sample` (Identity modules left out), in the order the
    modules finished."""
    finished: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                finished.append((name, output))

        return hook

    # an Identity (timm's `norm` of a mean-pooled ViT) passes its input on: never a layer to name
    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules()
               if n and not isinstance(m, nn.Identity)]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    outputs: list[Output] = []
    for name, tensor in finished:
        if outputs and outputs[-1].tensor is tensor:
            outputs[-1] = Output((*outputs[-1].names, name), tensor)
        else:
            outputs.append(Output((name,), tensor))
    return outputs


def feature_layout_of(output: torch.Tensor, sample: torch.Tensor, **settings: object) -> FeatureLayout | None:
    """The layout of a module's output when it is a feature grid larger than 1x1, else None."""
    try:
        layout = detect_layout(output.shape, tuple(sample.shape[-2:]), **settings, strict=True)
    except ExplanationError:
        return None
    return layout if layout.grid > 1 else None


def influences(
    embed: Callable[[Callable[[torch.Tensor], torch.Tensor] | None], torch.Tensor],
    layout: FeatureLayout,
) -> bool:
    """Whether perturbing the layer's patch grid changes the embedding.

    embed: runs the model on a fixed sample, the layer's output passed through the given
        replacement (None: unchanged), and returns the embedding (1, D).
    """
    generator = torch.Generator().manual_seed(0)

    def perturb(output: torch.Tensor) -> torch.Tensor:
        maps = layout.to_maps(output)
        noise = torch.randn(maps.shape, generator=generator).to(maps)
        return layout.from_maps(maps + noise * maps.float().std().clamp_min(1e-3).to(maps.dtype), output)

    plain, perturbed = embed(None).double(), embed(perturb).double()
    return bool((perturbed - plain).norm() > INFLUENCE_TOLERANCE * plain.norm().clamp_min(torch.finfo(torch.float64).tiny))


def default_target_layer(
    model: nn.Module, sample: torch.Tensor,
    embed_with: Callable[[nn.Module, Callable | None], torch.Tensor], **settings: object,
) -> str:
    """The default target layer (see the module's doc).

    embed_with(module, replace) runs the model on `sample` with `module`'s output replaced and
    returns its embedding. settings: feature_layout / prefix_tokens, as detect_layout takes them.
    A set feature_layout reads the default layer its own way (a channels-last grid that auto
    reads as NCHW), but never moves the default to another layer: forcing NCHW on a Swin or a ViT
    picked attention probabilities or the patch embedding, whose grids are not features.
    """
    chosen = _default_target_layer(model, sample, embed_with, **settings)
    forced = settings.get("layout", "auto")
    if forced != "auto":
        detected = _default_target_layer(model, sample, embed_with, **{**settings, "layout": "auto"})
        if detected != chosen:
            raise ExplanationError(
                f"feature_layout={forced!r} does not fit the model's default target layer, {detected}, and would move "
                f"it to {chosen}: leave feature_layout to auto, or name the layer (target_layer=)")
    return chosen


def _default_target_layer(
    model: nn.Module, sample: torch.Tensor,
    embed_with: Callable[[nn.Module, Callable | None], torch.Tensor], **settings: object,
) -> str:
    modules = dict(model.named_modules())
    outputs = module_outputs(model, sample)
    pooling = [name for name, module in modules.items()
               if name and any(kind in type(module).__name__.lower() for kind in ATTENTION_POOLING)]
    # an attention-pooling head and what follows it: its first output (a projection) ends the candidates
    pooled = next((index for index, output in enumerate(outputs)
                   if any(name == head or name.startswith(f"{head}.") for name in output.names for head in pooling)),
                  len(outputs))
    runs = Counter(name for output in outputs for name in output.names)  # a shared module runs more than once
    grids = [(output, layout) for output in outputs[:pooled]
             if runs[output.name] == 1 and (layout := feature_layout_of(output.tensor, sample, **settings)) is not None]
    prefix = settings.get("prefix_tokens")
    has_tokens = any(output.tensor.dim() == 3 for output in outputs)
    if prefix is not None and has_tokens and all(layout.kind != "tokens" for _, layout in grids):
        raise ExplanationError(  # else the default would move to a grid of another kind, the patch embedding
            f"prefix_tokens={prefix}, but none of the model's token outputs has that many tokens before a patch grid "
            "of the input: set prefix_tokens to the model's count of class / register tokens, or leave it unset "
            "to detect it")
    skipped: list[str] = []  # blocks without influence: nothing inside them is tried
    for output, layout in reversed(grids):
        if any(name.startswith(f"{block}.") for block in skipped for name in output.names):
            continue
        if influences(lambda replace, module=modules[output.name]: embed_with(module, replace), layout):
            if skipped and layout.prefix:  # class-token pooling: the tokens entering the first block
                return next(first.name for first, first_layout in grids if first_layout.prefix == layout.prefix)
            if layout.kind == "tokens" and not pooling:  # mean pooling: the tokens entering the first block too
                return _entering_first_block(modules, outputs, grids, layout) or output.name
            return output.name
        skipped.append(output.names[0])
    layout = settings.get("layout", "auto")
    if layout != "auto":
        raise ExplanationError(f"no module of the model outputs a feature grid of feature_layout={layout!r} that "
                               "influences the embedding: leave feature_layout to auto, or pass target_layer=")
    raise ExplanationError(
        "no module of the model outputs a feature grid that influences the embedding "
        "((N, C, h, w), (N, h, w, C) or tokens (N, P + h*w, C)); pass target_layer=, or, when the embedding "
        "does not depend on the picture at all (a zero-initialised head, such as torchvision's ViT heads "
        "built without weights), load the model's weights"
    )


def _entering_first_block(modules: dict[str, nn.Module], outputs: list[Output],
                          grids: list[tuple[Output, FeatureLayout]], layout: FeatureLayout) -> str | None:
    """A mean-pooled ViT's tokens entering its first block: the first grid of `layout` after the patch
    embedding's (the position embedding added, register tokens joined; timm's `pos_drop`), where it
    comes before the first block runs; else None. Only a single stack of blocks at one resolution
    qualifies: the model's first token grid is the patch embedding's, of `layout`'s h x w (without the
    register tokens that join after it), and the blocks are the children of the first container
    (Sequential, ModuleList) of two or more modules of one class that output grids of `layout`. An
    MLP-Mixer (no position embedding: its blocks follow the patch embedding at once) or a pyramid
    (Twins, LeViT) keeps the general rule."""
    tokens = [(output, found) for output, found in grids if found.kind == "tokens"]
    embedded = tokens[0][1]  # the patch embedding's grid
    same = [output for output, found in tokens[1:] if found == layout]
    if not same or (embedded.height, embedded.width) != (layout.height, layout.width):
        return None
    names = {name for output in same for name in output.names}
    containers = [(name, list(module.named_children())) for name, module in modules.items()
                  if isinstance(module, nn.Sequential | nn.ModuleList)]
    first_block = next((f"{name}.{children[0][0]}" for name, children in containers
                        if len(children) >= 2 and len({type(child) for _, child in children}) == 1
                        and all(f"{name}.{child}" in names for child, _ in children)), None)
    if first_block is None:
        return None
    order = {output.name: index for index, output in enumerate(outputs)}
    started = next(index for index, output in enumerate(outputs)
                   if any(name == first_block or name.startswith(f"{first_block}.") for name in output.names))
    return same[0].name if order[same[0].name] < started else None


def suggest_embedding_layer(model: nn.Module, sample: torch.Tensor, target_layer: str) -> str | None:
    """The last module after `target_layer` that outputs an unnormalised (B, D) embedding."""
    outputs = module_outputs(model, sample)
    after = next((i for i, o in enumerate(outputs) if target_layer in o.names), len(outputs))
    flat = [
        o.name for o in outputs[after + 1:]
        if o.tensor.dim() == 2 and o.tensor.shape[0] == sample.shape[0]
        and not has_unit_norm(o.tensor, o.tensor.dtype)
    ]
    return flat[-1] if flat else None


def modules_giving(model: nn.Module, sample: torch.Tensor, returned: object) -> list[tuple[str, str]]:
    """For a model that returns a tuple, list or dict: (module name, which item) for each (B, D)
    item that a module outputs, e.g. [("head", "item 0"), ("classifier", "item 1")]."""
    items = returned.items() if isinstance(returned, Mapping) else enumerate(returned) \
        if isinstance(returned, tuple | list) else ()
    items = [(key, tensor) for key, tensor in items if isinstance(tensor, torch.Tensor) and tensor.dim() == 2]
    outputs = module_outputs(model, sample) if items else []
    found = [(key, next((output.name for output in outputs
                         if output.tensor.shape == tensor.shape and torch.equal(output.tensor, tensor)), None))
             for key, tensor in items]
    return [(name, f"item {key!r}") for key, name in found if name is not None]
