"""Build the model a ModelSpec describes and load its weights safely."""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import math
import re
import zipfile
from collections.abc import Mapping

import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from pipeline.errors import UserError, did_you_mean
from pipeline.explain.layers import ExplanationError, find_module
from pipeline.io.storage import StorageError, StorageOptions, read_bytes, redact_uri
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")
_TRUST_HINT = "set `trust_checkpoint: true` to allow it, only for a file you trust"
_SHOWN = 5
RANDOM_INIT_SEED = 0  # the initialisation of a model built without weights
ZIP_START = b"PK\x03\x04"  # the local header of a zip's first entry (torch.save writes a zip)
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")  # where training checkpoints keep the model's state_dict
# torch.save's legacy format (_use_new_zipfile_serialization=False): a pickle of its magic number first
LEGACY_TORCH_START = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# torch.load(weights_only=True) names the class it refused in one of these forms, e.g. "Unsupported global:
# GLOBAL torch.nn...Linear" or (torch >= 2.14) "Trying to load unsupported GLOBAL posix.system whose module ...".
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error: (.+)")


class ModelLoadError(UserError):
    """The model of a ModelSpec could not be built or its weights not loaded."""


def random_weights_warning(spec: ModelSpec) -> str | None:
    """What to tell a user whose model has no weights to load (a factory builds its own), else None."""
    if spec.weights or spec.is_factory:
        return None
    return (f"model {spec.model_id} has no weights: explaining its random initialisation (seed {RANDOM_INIT_SEED}), "
            "the same in every replica and run; give the model its weights (model.weights) for a trained model")


def build_model(spec: ModelSpec, storage_options: StorageOptions | None = None) -> nn.Module:
    """The model of `spec`, weights loaded, in eval mode; without weights, the architecture's
    random initialisation seeded with RANDOM_INIT_SEED, so that every replica and run is the same.

    With `trust_checkpoint`, a checkpoint that holds a whole model (a pickled `nn.Module`) is
    used as the model itself, when its layers are those of `arch` and `embedding_dim`, which
    name it in the results.
    """
    return load_model(spec, storage_options)[0]


def load_model(spec: ModelSpec, storage_options: StorageOptions | None = None) -> tuple[nn.Module, ModelSpec]:
    """build_model's model, and `spec` with `weights_sha256` the SHA-256 of the weights it loaded
    (so that other replicas can be held to the same file)."""
    checkpoint, digest = _load_checkpoint(spec, storage_options) if spec.weights else (None, None)
    with torch.random.fork_rng(devices=[]):  # without weights: the same model in every replica and run
        torch.manual_seed(RANDOM_INIT_SEED)
        if spec.is_factory:
            model = _factory_model(spec.arch)
        else:
            model = _timm_model(spec) if spec.timm_name is not None else _torchvision_model(spec)
    if isinstance(checkpoint, nn.Module):
        _check_whole_model(checkpoint, model, spec)
        model = checkpoint
    elif checkpoint is not None:
        _load_state_dict(model, _unwrap_state_dict(checkpoint, spec.weights), spec.weights,
                         new_head=spec.embedding_dim is not None)
    for name, what in ((spec.target_layer, "target_layer"), (spec.embedding_layer, "embedding_layer")):
        if name is not None:
            resolve_layer_name(model, name, what)
    _check_patches_tile(model, spec)
    return model.eval(), spec.model_copy(update={"weights_sha256": digest})


def _check_patches_tile(model: nn.Module, spec: ModelSpec) -> None:
    """Refuses an input size that the model's patch embedding (a first convolution whose stride is
    its kernel: ViTs, Swin, ConvNeXt's stem) and the downsampling layers after it (more such
    convolutions: ConvNeXt's; patch merging: Swin's) do not cut into whole cells: the pixels past
    the last whole cell are never seen (or padded), and the maps would be stretched over them."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or not _cuts_patches(conv):
        return
    downsampling = [m for m in model.modules() if m is not conv and (
        (isinstance(m, nn.Conv2d) and _cuts_patches(m)) or "patchmerging" in type(m).__name__.lower())]
    cell = [math.prod(m.stride[i] if isinstance(m, nn.Conv2d) else 2 for m in (conv, *downsampling)) for i in (0, 1)]
    sides = spec.input_hw
    if all(side % size == 0 for side, size in zip(sides, cell)):
        return
    fits = [f"{side}" if side % size == 0 else f"{max(side // size, 1) * size} or {(side // size + 1) * size}"
            for side, size in zip(sides, cell)]
    example = fits[0] if sides[0] == sides[1] else f"height {fits[0]}, width {fits[1]}"
    cutters = f"patch embedding ({name})" + (f" and its {len(downsampling)} downsampling layers" if downsampling else "")
    raise ModelLoadError(
        f"model.input_size {sides[0]}x{sides[1]}: the model's {cutters} {'cut' if downsampling else 'cuts'} the image "
        f"into {cell[0]}x{cell[1]} px "
        f"cells, so the pixels past the last whole cell are never seen and the maps would be drawn over them: "
        f"use a multiple of {cell[0] if cell[0] == cell[1] else cell} ({example})")


def _cuts_patches(conv: nn.Conv2d) -> bool:
    """A convolution that cuts its input into non-overlapping patches: stride = kernel > 1, no padding."""
    return conv.kernel_size == conv.stride and conv.stride != (1, 1) and not any(conv.padding)


def _check_whole_model(whole: nn.Module, built: nn.Module, spec: ModelSpec) -> None:
    """Refuses a pickled whole model whose parameters and buffers (names and shapes) are not those
    of the model `spec` builds: the results would name a model that did not run."""
    expected = {name: tuple(t.shape) for name, t in built.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in whole.state_dict().items()}
    differing = [name for name in {**expected, **found} if expected.get(name) != found.get(name)]
    if differing:
        raise ModelLoadError(
            f"weights {spec.weights} hold a whole {type(whole).__name__} whose layers are not those of arch "
            f"{spec.arch!r} with embedding_dim {spec.embedding_dim} ({len(differing)} differ, e.g. {differing[0]}: "
            f"{found.get(differing[0], 'absent')} here, {expected.get(differing[0], 'absent')} in the arch): set "
            "model.arch and model.embedding_dim to the model it is, which the results name"
        )


def resolve_layer_name(model: nn.Module, name: str, what: str = "target_layer") -> nn.Module:
    """The submodule called `name` in `model.named_modules()`; the error suggests close names."""
    try:
        return find_module(model, name, what)
    except ExplanationError as error:
        raise ModelLoadError(str(error)) from error


def _torchvision_model(spec: ModelSpec) -> nn.Module:
    names = torchvision.models.list_models(module=torchvision.models)
    if spec.arch not in names:
        hint = _timm_hint(spec.arch.rpartition("/")[2]) or did_you_mean(spec.arch, names)
        raise ModelLoadError(f"unknown torchvision arch {spec.arch!r}{hint}")
    model = torchvision.models.get_model(spec.arch, weights=None)
    _replace_classifier(model, spec.embedding_dim, spec.arch)
    return model


def _timm_model(spec: ModelSpec) -> nn.Module:
    """A timm model without pretrained weights; num_classes=0 removes its classifier (the model
    outputs its pooled embedding), embedding_dim makes a new Linear head. Models with a fixed
    input size (ViTs) are built for spec.input_size."""
    name = spec.timm_name
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm arch {name!r}{did_you_mean(name, timm.list_models())}")
    options = {"pretrained": False, "num_classes": spec.embedding_dim or 0}
    try:
        try:
            return timm.create_model(name, img_size=spec.input_hw, **options)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(name, **options)  # the model takes any input size
    except Exception as e:
        raise ModelLoadError(f"arch {spec.arch!r}: timm could not build it: {type(e).__name__}: {e}") from e


def _replace_classifier(model: nn.Module, embedding_dim: int | None, arch: str) -> None:
    """Swap the final Linear for `Linear(K, embedding_dim)`, or `Identity` when None."""
    for attribute in _HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Linear):
            parent, name, linear = model, attribute, head
        elif isinstance(head, nn.Module):
            linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                continue
            parent_name, _, name = linears[-1].rpartition(".")
            parent = head.get_submodule(parent_name)
            linear = getattr(parent, name)
        else:
            continue
        new = nn.Identity() if embedding_dim is None else nn.Linear(linear.in_features, embedding_dim)
        setattr(parent, name, new)
        return
    raise ModelLoadError(
        f"arch {arch!r} has no Linear classifier in {', '.join(_HEAD_ATTRIBUTES)} to replace; "
        "wrap it in a factory ('package.module:factory') instead"
    )


def _factory_model(path: str) -> nn.Module:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"arch {path!r}: cannot import module {module_name!r} ({e}); a module of your own must be "
                             "importable where the job runs: PYTHONPATH=<its folder>, or pip install it") from e
    except (Exception, SystemExit) as e:  # a module that parses arguments or exits at import is not a success
        raise ModelLoadError(f"arch {path!r}: importing module {module_name!r} raised {_raised(e)}") from e
    factory = getattr(module, attribute, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        hint = (_timm_hint(attribute) if module_name == "timm" else "") or did_you_mean(attribute, public)
        raise ModelLoadError(f"arch {path!r}: module {module_name!r} has no callable {attribute!r}{hint}")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise ModelLoadError(f"arch {path!r}: the factory raised {_raised(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"arch {path!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _timm_hint(name: str) -> str:
    """"; timm has it: arch: timm/NAME" when timm builds a model of that name, else "" (for an arch
    written as NAME, tim/NAME or timm:NAME)."""
    return f"; timm has it: arch: timm/{name}" if name and timm.is_model(name) else ""


def _raised(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit: it called sys.exit({error.code!r}) (an argument parser or a script's exit)"
    return f"{type(error).__name__}: {error}"


def _load_checkpoint(spec: ModelSpec, storage_options: StorageOptions | None) -> tuple[object, str]:
    """The checkpoint at `spec.weights` (a state_dict, or a whole model when trusted) and its bytes' SHA-256."""
    uri = spec.weights
    try:
        data = read_bytes(uri, storage_options)
    except StorageError as e:
        raise ModelLoadError(f"cannot read weights {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if spec.weights_sha256 is not None and digest != spec.weights_sha256:
        raise ModelLoadError(f"weights {uri} have SHA-256 {digest}, not weights_sha256 {spec.weights_sha256}: "
                             "the file changed, or the pin is wrong")
    if _is_safetensors(data):
        try:
            return safetensors.torch.load(data), digest
        except Exception as e:
            cut = " (the file is truncated or corrupt: copy it again)" if "not fully covered" in str(e) else ""
            raise ModelLoadError(f"weights {uri} are not a readable safetensors file: {short_reason(e)}{cut}") from e
    if uri.endswith(".safetensors"):
        raise ModelLoadError(f"weights {uri} are named .safetensors but do not start with a safetensors header")
    if not zipfile.is_zipfile(io.BytesIO(data)) and not data.startswith(LEGACY_TORCH_START):
        if data.startswith(ZIP_START):  # a zip's first entry without the directory at its end
            raise ModelLoadError(f"weights {uri} are a zip archive cut short ({len(data):,} bytes, without the end "
                                 "of the zip; torch.save writes one): the file is truncated or corrupt; copy or save "
                                 "it again")
        if data.startswith(b"\x80"):  # pickle's PROTO opcode
            raise ModelLoadError(f"weights {uri} are a plain Python pickle (pickle.dump), not a torch.save checkpoint: "
                                 "a pickle can run code when it is loaded, and torch reads none; save the tensors with "
                                 "torch.save(model.state_dict(), path) or safetensors")
        raise ModelLoadError(f"weights {uri} are neither a torch.save checkpoint nor a safetensors file")
    if _is_torchscript(data):
        raise ModelLoadError(f"weights {uri} are a TorchScript archive: explaining hooks into the model's layers, "
                             "which TorchScript modules do not run; save the model's state_dict instead "
                             "(torch.save(model.state_dict(), path)) and name its arch")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not spec.trust_checkpoint), digest
    except Exception as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe and not spec.trust_checkpoint:
            raise ModelLoadError(
                f"weights {uri} are not a plain state_dict: they hold pickled Python objects ({unsafe[1]}), such as "
                "a whole nn.Module or a training script's objects (argparse.Namespace); save only the tensors "
                f"(torch.save(model.state_dict(), ...)), or {_TRUST_HINT}"
            ) from e
        raise ModelLoadError(f"weights {uri} are not a readable torch checkpoint: {short_reason(e)}") from e


def _is_safetensors(data: bytes) -> bool:
    """safetensors files start with the little-endian u64 length of a JSON header, then `{`."""
    if len(data) < 10:
        return False
    return int.from_bytes(data[:8], "little") <= len(data) - 8 and data[8:9] == b"{"


def _is_torchscript(data: bytes) -> bool:
    """TorchScript archives are zips with `<root>/constants.pkl` and `<root>/code/`."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        inner = [name.partition("/")[2] for name in archive.namelist()]
    return any(name == "constants.pkl" or name.startswith("code/") for name in inner)


def _unwrap_state_dict(checkpoint: object, uri: str) -> Mapping[str, torch.Tensor]:
    """Accept a state_dict or a training checkpoint that wraps one under CHECKPOINT_KEYS (the other
    state_dicts it holds, an EMA copy or the optimizer's among them, are named in the log, not loaded)."""
    if isinstance(checkpoint, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                others = [name for name, value in checkpoint.items() if name != key and isinstance(value, Mapping)]
                if others:
                    log.warning("weights %s: loading the state_dict under %r; not loaded: %s", redact_uri(uri), key,
                                ", ".join(repr(name) for name in others))
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        keys = ", ".join(repr(key) for key in list(checkpoint)[:10]) if isinstance(checkpoint, Mapping) else ""
        found = f" (its keys: {keys}; a state_dict is looked for under {', '.join(map(repr, CHECKPOINT_KEYS))})" if keys else ""
        raise ModelLoadError(
            f"weights {uri} hold a {type(checkpoint).__name__}, not a state_dict (a mapping of names to tensors){found}: "
            "save the model's own, torch.save(model.state_dict(), path)"
        )
    if checkpoint and all(k.startswith("module.") for k in checkpoint):  # saved from DataParallel / DDP
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


def _under_one_prefix(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """The first name component (`model.` of a LightningModule, `backbone.`) under which the
    checkpoint holds every one of the model's keys, where its own keys are not the model's."""
    if set(expected) <= set(state_dict):
        return None
    for prefix in sorted({key.split(".", 1)[0] + "." for key in state_dict if "." in key}):
        if {key.removeprefix(prefix) for key in state_dict if key.startswith(prefix)} >= set(expected):
            return prefix
    return None


def _load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], uri: str, new_head: bool = False) -> None:
    """Loads the checkpoint, or names what does not match and the likely cause. new_head: the model
    was built with embedding_dim's Linear head, which the checkpoint must hold."""
    expected = model.state_dict()
    prefix = _under_one_prefix(state_dict, expected)
    if prefix is not None and all(key.startswith(prefix) for key in state_dict):  # saved from a wrapper: the model's own
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]  # model order
    shape_lines = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shape_lines))
        if items
    ]
    if problems:
        tokens = _prefix_token_hint(missing, unexpected)
        another_width = _of_another_width(mismatched, state_dict, expected)
        # other prefix tokens make the position embeddings' lengths differ too: their hint would mislead
        shapes = _ANOTHER_WIDTH if another_width else "" if tokens else _position_hint(mismatched, state_dict, model)
        built_otherwise = bool(tokens) or another_width  # the model must be built as it was trained
        raise ModelLoadError(f"weights {uri} do not match the model: " + "; ".join(problems)
                             + _head_hint(unexpected, state_dict) + _new_head_hint(missing, unexpected, new_head)
                             + tokens + shapes
                             + (f"; {_TIMM_SETTINGS}" if built_otherwise else "")
                             + (f". The model's keys are all in the checkpoint under {prefix!r}, beside others: save "
                                f"that part alone (e.g. the LightningModule's model.state_dict())" if prefix else ""))
    model.load_state_dict(state_dict, strict=True)


_TIMM_SETTINGS = ("for timm settings other than the named model's, write a factory (arch: package.module:function) "
                  "that returns timm.create_model(name, pretrained=False, num_classes=0, ...) with them")
_ANOTHER_WIDTH = (". The checkpoint is of a model of another width (another size of the architecture): build the arch "
                  "it was trained as")
_PREFIX_TOKENS = ("cls_token", "reg_token", "dist_token")  # timm's class, register and distillation tokens


def _prefix_token_hint(missing: list[str], unexpected: list[str]) -> str:
    """When a class, register or distillation token is in one of model and checkpoint only: another
    pooling or token count, which also makes the position embeddings' lengths differ."""
    only_model = [k for k in missing if k.rsplit(".", 1)[-1] in _PREFIX_TOKENS]
    only_checkpoint = [k for k in unexpected if k.rsplit(".", 1)[-1] in _PREFIX_TOKENS]
    found = [f"{side} has {', '.join(keys)}" for side, keys in (("only the checkpoint", only_checkpoint),
                                                                 ("only the model", only_model)) if keys]
    if not found:
        return ""
    return (f". {'; '.join(found)}: the checkpoint was trained with other prefix tokens (class_token, reg_tokens) "
            "and pooling (global_pool); build the model as it was trained")


def _of_another_width(mismatched: list[str], state_dict: Mapping[str, torch.Tensor],
                      expected: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's position embeddings or norms are of another width than the model's."""
    widths = [k for k in mismatched if ("pos_embed" in k or "norm" in k) and state_dict[k].dim() and expected[k].dim()]
    return any(state_dict[k].shape[-1] != expected[k].shape[-1] for k in widths)


def _position_hint(mismatched: list[str], state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """When a position embedding's length differs: the input size the checkpoint was made for."""
    embedding = next((k for k in mismatched if "pos_embed" in k), None)
    if embedding is not None:
        size = _trained_input_size(state_dict[embedding], model)
        return (". A position embedding of another length: the checkpoint was made for another input size; "
                f"set model.input_size to it{f' ({size}, if its patch grid is square)' if size else ''}")
    return ""


def _trained_input_size(position_embedding: torch.Tensor, model: nn.Module) -> int | None:
    """The square input side a timm ViT's (1, P + n, C) or (1, n, C) position embedding was made for:
    sqrt(n) patches of the model's patch size, with or without its P prefix tokens."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    prefix = getattr(model, "num_prefix_tokens", 0)
    if not isinstance(patch, tuple | list) or patch[0] != patch[-1] or position_embedding.dim() != 3:
        return None
    for patches in (position_embedding.shape[1] - prefix, position_embedding.shape[1]):  # timm may leave prefix out
        side = math.isqrt(max(patches, 0))
        if side and side * side == patches:
            return side * int(patch[0])
    return None


def _head_hint(unexpected: list[str], state_dict: Mapping[str, torch.Tensor]) -> str:
    """When the only surplus keys are a classifier / projection head the model was built
    without, say how to keep it."""
    heads = [k for k in unexpected if k.partition(".")[0] in _HEAD_ATTRIBUTES and k.endswith(".weight")]
    if len(heads) != 1 or len(unexpected) > 2 or state_dict[heads[0]].dim() != 2:
        return ""
    out_features = state_dict[heads[0]].shape[0]
    prefix = heads[0].rsplit(".", 1)[0]
    return (f". The checkpoint has a head ({heads[0]}: {tuple(state_dict[heads[0]].shape)}); "
            f"set `embedding_dim: {out_features}` to load it as the embedding head (a projection), or, for the "
            f"pooled features under a classifier, save the checkpoint without its {prefix}.* keys")


def _new_head_hint(missing: list[str], unexpected: list[str], new_head: bool) -> str:
    """When the only keys missing are those of the head that embedding_dim added."""
    if not new_head or unexpected or not missing or any(k.partition(".")[0] not in _HEAD_ATTRIBUTES for k in missing):
        return ""
    return (". They are the Linear head that `embedding_dim` adds, which this checkpoint does not hold: remove "
            "embedding_dim to explain the pooled features it was saved with")


def short_reason(error: Exception) -> str:
    """The informative line of an error's (often very long) message, e.g. torch.load's."""
    text = str(error)
    detail = _UNPICKLER_DETAIL.search(text)
    lines = text.strip().splitlines()
    return detail[1] if detail else lines[0] if lines else type(error).__name__
