from __future__ import annotations

import argparse
import hashlib
import io
import logging
import pickle

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from pipeline.io.storage import write_bytes
from pipeline.models.loading import ModelLoadError, build_model, load_model, resolve_layer_name
from pipeline.models.spec import ModelSpec


def images(rng: np.random.Generator, batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32))


def saved(obj: object, legacy: bool = False) -> bytes:
    """torch.save's bytes: a zip, or its legacy format (a pickle stream) where `legacy`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def resnet18_64() -> nn.Module:
    """A resnet18 with a 64-d embedding head and random weights (built once: copy before changing)."""
    return build_model(ModelSpec(arch="resnet18", embedding_dim=64))


@torch.no_grad()
def test_embedding_head(resnet18_64: nn.Module, rng: np.random.Generator) -> None:
    assert isinstance(resnet18_64.fc, nn.Linear) and resnet18_64.fc.in_features == 512
    assert not resnet18_64.training
    assert resnet18_64(images(rng, batch=3)).shape == (3, 64)


def test_without_weights_every_build_is_the_same_model(resnet18_64: nn.Module) -> None:
    """Replicas (one per actor) and re-runs explain the same random initialisation; the caller's RNG is untouched."""
    state = torch.random.get_rng_state()
    again = build_model(ModelSpec(arch="resnet18", embedding_dim=64))
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, first), (_, second) in zip(resnet18_64.state_dict().items(), again.state_dict().items()):
        assert torch.equal(first, second), name
    assert resnet18_64.fc.weight.std() > 0  # initialised, not zeros


@torch.no_grad()
def test_no_embedding_dim_returns_pooled_features(rng: np.random.Generator) -> None:
    model = build_model(ModelSpec(arch="resnet18"))
    assert isinstance(model.fc, nn.Identity)
    assert model(images(rng)).shape == (2, 512)


@torch.no_grad()
def test_classifier_sequential_last_linear_is_replaced(rng: np.random.Generator) -> None:
    model = build_model(ModelSpec(arch="mobilenet_v3_small", embedding_dim=32))
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].out_features == 32
    assert model(images(rng)).shape == (2, 32)


def test_vit_heads_are_replaced() -> None:
    model = build_model(ModelSpec(arch="vit_b_16", embedding_dim=16))
    assert model.heads.head.in_features == 768 and model.heads.head.out_features == 16


@pytest.mark.parametrize(
    ("where", "wrapper"), [("local", None), ("s3", None), ("local", "state_dict"), ("local", "model"),
                           ("local", "model_state_dict"), ("local", "ddp")]
)
@torch.no_grad()
def test_state_dict_roundtrip_reproduces_outputs(
    resnet18_64: nn.Module, where: str, wrapper: str | None, rng: np.random.Generator, tmp_path, request
) -> None:
    state = resnet18_64.state_dict()
    checkpoint = {
        None: state,
        "state_dict": {"state_dict": state, "epoch": 7},
        "model": {"model": state},
        "model_state_dict": {"model_state_dict": state, "optimizer_state_dict": {}, "epoch": 3},  # PyTorch's tutorials'
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrapper]
    options = None
    if where == "local":
        uri = str(tmp_path / "weights.pt")
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/models/weights.pt"
    write_bytes(uri, saved(checkpoint), options)

    loaded = build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=uri), options)

    x = images(rng)  # a fresh random init would give other outputs: the weights must have been loaded
    assert torch.equal(loaded(x), resnet18_64(x))


@torch.no_grad()
def test_a_training_checkpoint_names_the_state_dicts_it_does_not_load(
    resnet18_64: nn.Module, rng: np.random.Generator, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    state = resnet18_64.state_dict()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(saved({"epoch": 5, "model": state, "ema": {k: torch.zeros_like(v) for k, v in state.items()}}))
    with caplog.at_level(logging.WARNING, logger="pipeline.models.loading"):
        loaded = build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))
    x = images(rng)
    assert torch.equal(loaded(x), resnet18_64(x))
    assert f"weights {path}: loading the state_dict under 'model'; not loaded: 'ema'" in caplog.text


def test_pickled_model_needs_trust(resnet18_64: nn.Module, rng: np.random.Generator, tmp_path) -> None:
    path = tmp_path / "full.pt"
    path.write_bytes(saved(resnet18_64))
    with pytest.raises(ModelLoadError, match="trust_checkpoint: true") as info:
        build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))
    assert str(path) in str(info.value)

    trusted = build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path), trust_checkpoint=True))
    x = images(rng)
    with torch.no_grad():
        assert torch.equal(trusted(x), resnet18_64(x))


def test_a_training_script_s_checkpoint_names_the_object_it_holds(resnet18_64: nn.Module, tmp_path) -> None:
    """Many training scripts save their argparse.Namespace beside the state_dict: the refusal names it
    (torch 2.14 words its error differently from earlier versions) and says how to re-save."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(saved({"state_dict": resnet18_64.state_dict(), "args": argparse.Namespace(lr=0.1)}))
    with pytest.raises(ModelLoadError, match=r"pickled Python objects \(argparse.Namespace\).*model.state_dict\(\)"):
        build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))


def test_a_pickled_model_must_be_the_arch_it_is_named(rng: np.random.Generator, tmp_path) -> None:
    """The results name the arch: a whole resnet50 named resnet18 ran as resnet50 and was labelled resnet18."""
    path = tmp_path / "r50.pt"
    path.write_bytes(saved(torchvision.models.resnet50(num_classes=64)))
    spec = ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path), trust_checkpoint=True)
    with pytest.raises(ModelLoadError, match=r"a whole ResNet whose layers are not those of arch 'resnet18' with "
                                             r"embedding_dim 64 \(\d+ differ, e\.g\. .*\): set model\.arch"):
        build_model(spec)
    build_model(spec.model_copy(update={"arch": "resnet50"}))  # named as what it is


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("trusted", [False, True])
def test_torchscript_is_refused_with_the_way_out(trusted: bool, tmp_path) -> None:
    """A ScriptModule runs no forward hooks: explaining it ended in a traceback."""
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(small), str(path))
    with pytest.raises(ModelLoadError, match=r"TorchScript archive: .* save the model's state_dict instead"):
        build_model(ModelSpec(arch="resnet18", weights=str(path), trust_checkpoint=trusted))


def test_weights_are_pinned_to_what_was_loaded(resnet18_64: nn.Module, tmp_path) -> None:
    data = saved(resnet18_64.state_dict())
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    spec = ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path))
    _, pinned = load_model(spec)
    assert pinned == spec.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest()})
    build_model(pinned)
    path.write_bytes(saved({k: v + 1 for k, v in resnet18_64.state_dict().items()}))  # replaced after the check
    with pytest.raises(ModelLoadError, match=f"model.pt have SHA-256 [0-9a-f]{{64}}, not weights_sha256 {pinned.weights_sha256}"):
        build_model(pinned)


def test_mismatched_state_dict_lists_keys(resnet18_64: nn.Module, tmp_path) -> None:
    state = dict(resnet18_64.state_dict())
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.ones(3)
    path = tmp_path / "bad.pt"
    path.write_bytes(saved(state))
    with pytest.raises(ModelLoadError) as info:
        build_model(ModelSpec(arch="resnet18", embedding_dim=32, weights=str(path)))
    message = str(info.value)
    assert "missing keys (1): layer1.0.conv1.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "fc.weight: checkpoint (64, 512) vs model (32, 512)" in message


def test_embedding_dim_over_a_checkpoint_of_pooled_features_says_so(resnet18_64: nn.Module, tmp_path) -> None:
    """The head that embedding_dim adds, missing from the checkpoint, was named as two bare missing keys."""
    state = {k: v for k, v in resnet18_64.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "pooled.pt"
    path.write_bytes(saved(state))
    with pytest.raises(ModelLoadError, match=r"missing keys \(2\): fc.weight, fc.bias\. They are the Linear head that "
                                             r"`embedding_dim` adds.*remove embedding_dim"):
        build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))
    assert build_model(ModelSpec(arch="resnet18", weights=str(path))) is not None


def test_checkpoint_for_another_input_size_says_so(tmp_path) -> None:
    """A ViT's position embedding has one entry per patch: its length gives the input size away."""
    spec = ModelSpec(arch="timm/vit_tiny_patch16_224", input_size=64)
    path = tmp_path / "vit64.pt"
    path.write_bytes(saved(build_model(spec).state_dict()))
    with pytest.raises(ModelLoadError, match=r"pos_embed: checkpoint \(1, 17, 192\) vs model \(1, 37, 192\).*"
                                             r"another input size; set model.input_size to it \(64, if its patch "
                                             r"grid is square\)"):
        build_model(spec.model_copy(update={"input_size": 96, "weights": str(path)}))


def test_checkpoint_of_another_width_says_so(tmp_path) -> None:
    """The same family at another size: not a matter of input size."""
    path = tmp_path / "small.pt"
    path.write_bytes(saved(build_model(ModelSpec(arch="timm/vit_tiny_patch16_224", input_size=64)).state_dict()))
    with pytest.raises(ModelLoadError, match=r"pos_embed: checkpoint \(1, 17, 192\) vs model \(1, 17, 384\).*"
                                             r"a model of another width") as info:
        build_model(ModelSpec(arch="timm/vit_small_patch16_224", input_size=64, weights=str(path)))
    assert "input size" not in str(info.value)


def test_checkpoint_of_another_pooling_says_so(tmp_path) -> None:
    """A mean-pooled ViT's weights (no class token) in the class-token model of its name: the position
    embedding is one shorter, which is the class token, not another input size."""
    path = tmp_path / "mean_pooled.pt"
    mean_pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64,
                                    class_token=False, global_pool="avg")
    path.write_bytes(saved(mean_pooled.state_dict()))
    with pytest.raises(ModelLoadError, match=r"only the model has cls_token: the checkpoint was trained with other prefix "
                                             r"tokens .* write a factory \(arch: package.module:function\)") as info:
        build_model(ModelSpec(arch="timm/vit_tiny_patch16_224", input_size=64, weights=str(path)))
    assert "input size" not in str(info.value)


def test_checkpoint_of_a_wrapper_module(resnet18_64: nn.Module, rng: np.random.Generator, tmp_path) -> None:
    """A LightningModule saves its model's keys under `model.`: read as the model's own; beside a
    loss's parameters, the message says where the model's keys are."""
    state = resnet18_64.state_dict()
    path = tmp_path / "lightning.pt"
    path.write_bytes(saved({"state_dict": {f"model.{k}": v for k, v in state.items()}}))
    loaded = build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))
    x = images(rng)
    with torch.no_grad():
        assert torch.equal(loaded(x), resnet18_64(x))
    path.write_bytes(saved({**{f"model.{k}": v for k, v in state.items()}, "loss.proxies": torch.zeros(10, 64)}))
    with pytest.raises(ModelLoadError, match=r"The model's keys are all in the checkpoint under 'model\.', beside others"):
        build_model(ModelSpec(arch="resnet18", embedding_dim=64, weights=str(path)))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"not a checkpoint at all", "neither a torch.save checkpoint nor a safetensors file"),
     (pickle.dumps({"w": [1.0]}), r"a plain Python pickle \(pickle.dump\), not a torch.save checkpoint"),
     (saved({"w": torch.ones(1000)}, legacy=True)[:200], "not a readable torch checkpoint"),
     (saved({"epoch": 3}), "not a state_dict"),
     (saved({"net": {"fc.weight": torch.ones(2, 2)}, "epoch": 3}),
      r"hold a dict, not a state_dict \(a mapping of names to tensors\) \(its keys: 'net', 'epoch'; a state_dict is "
      r"looked for under 'state_dict', 'model', 'model_state_dict'\)"),
     (saved({"w": torch.ones(1000)})[:2000], r"a zip archive cut short \(2,000 bytes, without the end of the zip; torch.save writes one\)")],
)
def test_checkpoint_that_is_not_a_state_dict(payload: bytes, reason: str, tmp_path) -> None:
    path = tmp_path / "odd.pt"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match=reason):
        build_model(ModelSpec(arch="resnet18", weights=str(path)))


def test_the_legacy_torch_save_format_loads(tmp_path) -> None:
    model = build_model(ModelSpec(arch="resnet18", embedding_dim=16))
    path = tmp_path / "legacy.pt"
    path.write_bytes(saved(model.state_dict(), legacy=True))
    loaded = build_model(ModelSpec(arch="resnet18", embedding_dim=16, weights=str(path)))
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())


def test_unreadable_weights_uri(tmp_path, s3_bucket) -> None:
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match=f"cannot read weights {missing}: not found"):
        build_model(ModelSpec(arch="resnet18", weights=missing))
    bucket, options = s3_bucket
    uri = f"s3://{bucket}/nope.pt"
    with pytest.raises(ModelLoadError, match=f"cannot read weights {uri}: not found"):
        build_model(ModelSpec(arch="resnet18", weights=uri), options)


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(ModelLoadError, match="unknown torchvision arch 'resnet5'.*resnet50"):
        build_model(ModelSpec(arch="resnet5"))
    with pytest.raises(ModelLoadError, match="unknown torchvision arch 'vit_tiny_patch16_224'; timm has it: "
                                             "arch: timm/vit_tiny_patch16_224"):
        build_model(ModelSpec(arch="vit_tiny_patch16_224"))
    for typo in ("tim/vit_tiny_patch16_224", "timm:vit_tiny_patch16_224"):  # said only "unknown" / "no callable"
        with pytest.raises(ModelLoadError, match="; timm has it: arch: timm/vit_tiny_patch16_224$"):
            build_model(ModelSpec(arch=typo))
    with pytest.raises(ModelLoadError, match="target_layer '' is not a module"):  # "" named the whole model
        build_model(ModelSpec(arch="resnet18", target_layer=""))


@pytest.mark.parametrize("field", ["target_layer", "embedding_layer"])
def test_unknown_layer_suggests_close_names(field: str) -> None:
    with pytest.raises(ModelLoadError, match=f"{field} 'layer5' is not a module.*layer4"):
        build_model(ModelSpec(arch="resnet18", **{field: "layer5"}))


def test_resolve_layer_name(resnet18_64: nn.Module) -> None:
    assert resolve_layer_name(resnet18_64, "layer4.1.conv2") is resnet18_64.layer4[1].conv2
    with pytest.raises(ModelLoadError, match="embedding_layer 'layer4.1.conv3'.*layer4.1.conv2"):
        resolve_layer_name(resnet18_64, "layer4.1.conv3", "embedding_layer")


@torch.no_grad()
def test_factory_model_is_used_as_is(rng: np.random.Generator) -> None:
    model = build_model(ModelSpec(arch="torchvision.models:resnet18", target_layer="layer4"))
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 1000
    assert model(images(rng)).shape == (2, 1000)


@pytest.mark.parametrize(
    ("arch", "reason"),
    [
        ("no_such_package_sfam.models:make", "cannot import module 'no_such_package_sfam.models'"),
        ("torchvision.models:resnet5", "has no callable 'resnet5'.*resnet50"),
        ("builtins:dict", "returned dict, not an nn.Module"),
        ("math:sqrt", "the factory raised TypeError"),
        ("builtins:exit", r"the factory raised SystemExit: it called sys.exit\(None\)"),  # was exit 0, nothing done
    ],
)
def test_bad_factory(arch: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match=reason):
        build_model(ModelSpec(arch=arch))


def test_spec_model_id() -> None:
    assert ModelSpec(arch="resnet50").model_id == "resnet50"
    assert ModelSpec(arch="resnet50", embedding_dim=512).model_id == "resnet50+fc512"
    assert ModelSpec(arch="my_pkg.nets:build").model_id == "my_pkg.nets:build"


@pytest.mark.parametrize(
    "fields",
    [
        {"arch": "resnet50", "unknown_field": 1},
        {"arch": "my_pkg.nets:build", "embedding_dim": 128},
        {"arch": "my_pkg.nets:build:x"},
        {"arch": "resnet50", "input_size": 8},
        {"arch": "resnet50", "std": (0.2, 0.0, 0.2)},
        {"arch": "resnet50", "metric": "manhattan"},
        {"arch": "resnet50", "embedding_dim": 0},
        {"arch": ""},
    ],
)
def test_spec_validation(fields: dict) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(**fields)


@torch.no_grad()
def test_timm_arch_outputs_pooled_embedding(rng: np.random.Generator) -> None:
    """timm models are built without downloads, classifier removed, at the spec's input size."""
    model = build_model(ModelSpec(arch="timm/vit_tiny_patch16_224", input_size=32))
    assert model.num_classes == 0 and not model.training
    assert model(images(rng, size=32)).shape == (2, 192)
    assert build_model(ModelSpec(arch="timm/convnext_atto", embedding_dim=24))(images(rng)).shape == (2, 24)


@torch.no_grad()
def test_safetensors_weights_roundtrip(rng: np.random.Generator, tmp_path) -> None:
    spec = ModelSpec(arch="timm/vit_tiny_patch16_224", input_size=32, embedding_dim=16)
    source = build_model(spec)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    loaded = build_model(spec.model_copy(update={"weights": str(path)}))
    x = images(rng, size=32)
    assert torch.equal(loaded(x), source(x))
    # the checkpoint's head is surplus when the spec removes the classifier: say how to keep it
    with pytest.raises(ModelLoadError, match=r"unexpected keys \(2\): .*head.weight.*embedding_dim: 16`.*or, for the pooled features under a classifier, save the checkpoint without its head\.\* keys"):
        build_model(spec.model_copy(update={"weights": str(path), "embedding_dim": None}))


def test_bad_safetensors_and_unknown_timm_arch(tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="named .safetensors but"):
        build_model(ModelSpec(arch="resnet18", weights=str(path)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        build_model(ModelSpec(arch="resnet18", weights=str(truncated)))
    cut = tmp_path / "cut.safetensors"  # a download cut short
    safetensors.torch.save_file({"w": torch.ones(64)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"not a readable safetensors file: .*\(the file is truncated or corrupt"):
        build_model(ModelSpec(arch="resnet18", weights=str(cut)))
    with pytest.raises(ModelLoadError, match="unknown timm arch 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        build_model(ModelSpec(arch="timm/vit_tiny_patch16_22"))


@pytest.mark.parametrize(
    "fields",
    [{"arch": "timm/"}, {"arch": "resnet50", "feature_layout": "nwhc"}, {"arch": "resnet50", "prefix_tokens": -1}],
)
def test_spec_validation_of_new_fields(fields: dict) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(**fields)


@pytest.mark.parametrize(("arch", "size", "named"), [
    ("timm/vit_tiny_patch16_224", 63, r"\(patch_embed.proj\) cuts the image into 16x16 px cells.*\(48 or 64\)"),
    # ConvNeXt's stem (4 px) and its 3 downsampling convolutions (2 px each): a 7 x 7 grid for 240 px saw 224
    ("convnext_tiny", [64, 50], r"\(features.0.0\) and its 3 downsampling layers cut the image into 32x32 px cells.*"
                                r"multiple of 32 \(height 64, width 32 or 64\)"),
    # Swin's patch merging: an 8 x 8 grid for 240 px covered 256, padded
    ("timm/swin_tiny_patch4_window7_224", 240, r"\(patch_embed.proj\) and its 3 downsampling layers cut the image "
                                               r"into 32x32 px cells.*\(224 or 256\)"),
])
def test_an_input_size_that_patches_do_not_tile_is_refused(arch: str, size: object, named: str) -> None:
    """timm built a 3 x 3 grid for 63 px that saw pixels 0-47 only, and the maps were stretched over all 63."""
    with pytest.raises(ModelLoadError, match=r"model.input_size .*" + named):
        build_model(ModelSpec(arch=arch, input_size=size))
    build_model(ModelSpec(arch=arch, input_size=224 if "swin" in arch else 64))
