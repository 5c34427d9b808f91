"""Checking a choice among names, finding modules by name, reading / replacing their outputs with forward hooks, and the model's dtype."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.errors import UserError, did_you_mean


class ExplanationError(UserError, ValueError):
    """The model, its layers or its inputs cannot be explained as asked."""


def check_choice(argument: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, or an error naming the argument and the choices."""
    if value not in choices:
        raise ExplanationError(f"{argument}={value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")
    return value


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype, which its inputs are cast to (float16 images into a float32 model)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None else torch.float32


def find_module(model: nn.Module, name: str, argument: str = "target_layer") -> nn.Module:
    """The submodule called `name` in `model.named_modules()` (under any of its names, where a
    module is registered twice), or an error listing close names."""
    modules = dict(model.named_modules(remove_duplicate=False))
    if name in modules and name:  # "" is the whole model, never a layer
        return modules[name]
    hint = did_you_mean(name, [n for n in modules if n], cutoff=0.5) or _top_level_modules(model)
    raise ExplanationError(f"{argument} {name!r} is not a module of the model ({type(model).__name__}){hint}")


def _top_level_modules(model: nn.Module, shown: int = 12) -> str:
    """"; its top-level modules: a, b, ..." for an error about a layer name nothing resembles."""
    names = [name for name, _ in model.named_children()]
    listed = ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
    return (f"; its top-level modules: {listed} (a nested one is named with dots, as in model.named_modules(); "
            "leave the setting out for its default)") if names else ""


def layer_name(model: nn.Module, layer: str | nn.Module, argument: str = "target_layer") -> str:
    """The name of `layer`, given as a name or as one of `model`'s modules (as Grad-CAM libraries take it)."""
    if isinstance(layer, str):
        return layer
    if isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise ExplanationError(f"{argument}: the {type(layer).__name__} given is not a module of the model "
                                   f"({type(model).__name__})")
        return name
    raise ExplanationError(f"{argument} must be a module of the model or its name (e.g. 'layer4'), not "
                           f"{type(layer).__name__} {layer!r}")


@contextmanager
def hooked_output(
    module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[list[torch.Tensor]]:
    """Collects `module`'s output on each forward; `replace` may substitute it downstream.

    Yields a list that holds, after a forward, what the rest of the model received.
    """
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise ExplanationError(
                f"{type(_module).__name__} returns {type(output).__name__}, not a tensor"
            )
        new = replace(output) if replace is not None else output
        seen.append(new)
        return new if replace is not None else None

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def embeddings_of(model: nn.Module, embedding: nn.Module | None, images: torch.Tensor) -> object:
    """What embeds `images`: the model's output, or the output of `embedding`, one of its modules
    (the caller checks that it is a (B, D) tensor)."""
    if embedding is None:
        return model(images)
    with hooked_output(embedding) as seen:
        model(images)
    return seen[-1]
