from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, load_config, load_yaml

BASE = """
manifest: s3://bucket/pairs.parquet
output: s3://bucket/audits
model:
  arch: resnet50
  embedding_dim: 512
storage_options: {endpoint_url: http://127.0.0.1:9000}
"""


@pytest.mark.parametrize(("override", "message"), [
    ("output=s3://alice:hunter2@bucket/audits", r"output: s3://\*\*\*@bucket/audits holds credentials \(user:password@\)"),
    ("manifest=https://h/pairs.parquet?X-Amz-Signature=hunter2", r"manifest: https://h/pairs.parquet\?X-Amz-Signature=\*\*\* "
                                                                 "holds a secret in its query"),
    ("model.weights=s3://b/w.pt?token=hunter2", r"model.weights: s3://b/w.pt\?token=\*\*\* holds a secret in its query"),
])
def test_credentials_in_a_uri_are_refused_when_the_config_is_read(tmp_path, override: str, message: str) -> None:
    """The config goes into the run record: such a URI was refused only where it was first opened."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, [override])
    assert "hunter2" not in str(error.value)


def test_yaml_with_overrides(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    config = load_config(path, ["model.metric=dot", "batch_size=8", "render_png=false", "run_id=nightly-2026-11-26"])
    assert (config.model.metric, config.batch_size, config.render_png) == ("dot", 8, "none")  # the boolean form
    assert config.run_id == "nightly-2026-11-26" and config.model.input_size == 224
    assert config.gpus_per_actor is None and config.storage_options.endpoint_url == "http://127.0.0.1:9000"
    assert load_config(path).run_id.startswith("run-")  # default from the UTC time


@pytest.mark.parametrize(("override", "message"), [
    ("model.colour=red", "model.colour"),
    ("render_pngs=all", r"render_pngs: .*; did you mean: render_png\?"),
    ("model.weigths=m.pt", r"; did you mean: model.weights\?"),
    ("storage_options.aws_secret_access_key=abc", "aws_secret_access_key"),
    ("bogus=1", "bogus"),
    ("model.metric=manhattan", "model.metric"),
    ("run_id=../../etc", "run_id"),
    ("batch_size", "KEY=VALUE"),
    ("model.arch=[a", r"^--set 'model.arch=\[a': the value is not YAML: [^\n]+$"),
    ("run_id=[a", "run_id: run_id may hold letters"),
    ("gates.false_match_similarity=.nan", "false_match_similarity: Input should be a finite number"),  # no gate at all
    ("gates.max_similarity_drop=.inf", "max_similarity_drop: Input should be a finite number"),
    ("render_flags.weak_match_similarity=.nan", "weak_match_similarity: Input should be a finite number"),
    ("actor_memory=6", r"actor_memory: .*6 bytes is less than a model replica needs \(a bare number is bytes\): give a "
                       r"size with its unit, e.g. 6GiB"),
    ("actor_memory=-1GiB", "actor_memory"),
    ("gates.false_match_similarity=80", r"false_match_similarity 80 is outside cosine similarity's range \[-1, 1\], so no "
                                        r"pair would count"),
    ("gates.false_match_similarity=-5", r"-5 is outside .*so every different-label pair would count as a false match"),
    ("model.input_size=8", r"model.input_size: .*each side must be from 16 to 4096 px"),
    ("model.input_size=100000", r"model.input_size: .*each side must be from 16 to 4096 px"),  # a 120 GB check picture
    ("model.input_size=[256,5000]", r"model.input_size: .*each side must be from 16 to 4096 px"),
    # the weights and input size went with it: a random model, audited without a word
    ("model=timm/vit_small_patch16_224", r"^--set 'model=timm/vit_small_patch16_224' would replace the whole model section "
                                         r"\(arch, .*\): set one of its keys, e.g. --set model.arch=timm/vit_small_patch16_224$"),
])
def test_bad_overrides_are_errors(tmp_path, override: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_overrides_of_the_model_short_form(tmp_path) -> None:
    """`model: resnet50` (the README's short form) is a section that --set can reach into."""
    path = tmp_path / "cfg.yaml"
    path.write_text("manifest: s3://bucket/pairs.parquet\noutput: s3://bucket/audits\nmodel: resnet50\n")
    config = load_config(path, ["model.metric=dot"])
    assert (config.model.arch, config.model.metric) == ("resnet50", "dot")
    config = load_config(path, ["model=resnet18", "model.weighting=partner"])
    assert (config.model.arch, config.model.weighting) == ("resnet18", "partner")


def test_an_output_inside_the_manifest_folder_is_refused(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=r"^invalid config: .*output s3://bucket/pairs.parquet/audits is inside the "
                                          r"manifest folder s3://bucket/pairs.parquet: a later run would read"):
        load_config(path, ["output=s3://bucket/pairs.parquet/audits/"])
    assert load_config(path, ["output=s3://bucket/pairs.parquet-audits"]).output == "s3://bucket/pairs.parquet-audits"


def test_dates_stay_strings(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + "run_id: 2026-11-25\n")
    assert load_config(path).run_id == "2026-11-25"
    assert load_config(path, ["run_id=2026-11-26"]).run_id == "2026-11-26"
    assert load_config(path, ["model.weighting=partner"]).model.weighting == "partner"


def test_render_policy(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    assert load_config(path).render_png == "flagged"  # the default: what an auditor looks at first
    config = load_config(path, ["render_png=all", "render_flags.false_match_similarity=0.9"])
    assert (config.render_png, config.render_flags.false_match_similarity) == ("all", 0.9)
    with pytest.raises(ConfigError, match="render_png"):
        load_config(path, ["render_png=some"])


def test_unreadable_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nowhere.yaml")


def test_a_config_not_in_utf8_is_named(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes("run_id: café\n".encode("latin-1"))  # an editor's legacy encoding; or a binary file
    with pytest.raises(ConfigError, match=r"cannot read config .*cfg.yaml: not UTF-8 text \(byte 11\)"):
        load_config(path)


def test_broken_yaml_is_one_line(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("manifest: [a\nmodel: {arch: x\n")
    with pytest.raises(ConfigError, match="cannot read config") as info:
        load_config(path)
    assert "\n" not in str(info.value) and "line 1" in str(info.value)


def test_a_key_written_twice_is_refused(tmp_path) -> None:
    """PyYAML keeps the last of two equal keys: a second `model:` block would silently replace the first."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + "render_png: none\nrender_png: all\n")
    with pytest.raises(ConfigError, match=r"cannot read config .*: line 9: key 'render_png' appears twice"):
        load_config(path)
    assert load_yaml("base: &b {x: 1, y: 2}\nrun: {<<: *b, y: 3}") == {"base": {"x": 1, "y": 2}, "run": {"x": 1, "y": 3}}


def test_residual_gate_refused_for_euclidean(tmp_path) -> None:
    """A Euclidean residual holds -1/2 |u^y|^2 by construction: a gate on its share would fail every run."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    assert load_config(path, ["gates.max_residual_share=0.2"]).gates.max_residual_share == 0.2
    with pytest.raises(ConfigError, match=r"gates.max_residual_share does not apply to metric euclidean"):
        load_config(path, ["gates.max_residual_share=0.2", "model.metric=euclidean"])


def test_false_match_gate_refused_where_euclidean_never_reaches_its_threshold(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=r"false_match_similarity 0.8 is above every euclidean similarity"):
        load_config(path, ["gates.max_false_match_rate=0.05", "model.metric=euclidean"])
    config = load_config(path, ["gates.max_false_match_rate=0.05", "model.metric=euclidean",
                                "gates.false_match_similarity=-0.5"])
    assert config.gates.false_match_similarity == -0.5


def test_a_folder_manifest_loses_its_trailing_slash_but_a_bucket_root_keeps_it(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    assert load_config(path, ["manifest=s3://bucket/pairs/"]).manifest == "s3://bucket/pairs"
    assert load_config(path, ["manifest=s3://pairs/", "output=s3://audits"]).manifest == "s3://pairs/"


def test_a_file_uri_is_its_path(tmp_path) -> None:
    """One manifest, one name: the similarity gate finds the runs of the same manifest however it was spelt."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    manifest = tmp_path / "night 1" / "pairs.parquet"
    assert load_config(path, [f"manifest={manifest.as_uri()}"]).manifest == str(manifest)


def test_one_false_match_threshold(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    for key in ("gates", "render_flags"):  # set in either, it is both
        config = load_config(path, [f"{key}.false_match_similarity=0.6"])
        assert config.gates.false_match_similarity == config.render_flags.false_match_similarity == 0.6
    assert load_config(path).gates.false_match_similarity == 0.8
    with pytest.raises(ConfigError, match="differ"):
        load_config(path, ["gates.false_match_similarity=0.6", "render_flags.false_match_similarity=0.7"])
    path.write_text(yaml.safe_dump(load_config(path).model_dump(mode="json")))  # written out in full: both keys
    config = load_config(path, ["gates.false_match_similarity=0.6"])
    assert config.gates.false_match_similarity == config.render_flags.false_match_similarity == 0.6


def test_a_run_id_with_a_final_newline_is_refused(tmp_path) -> None:
    """`$` matches before a final newline: "nl\\n" made folders runs/nl\\n/ and failed at commit."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + 'run_id: "nl\\n"\n')
    with pytest.raises(ConfigError, match="run_id may hold letters"):
        load_config(path)


def test_a_run_id_that_looks_like_a_number(tmp_path) -> None:
    """A nightly id such as 20261126 was 'Input should be a valid string'."""
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    assert load_config(path, ["run_id=20261126"]).run_id == "20261126"
    assert load_config(path, ["run_id=007"]).run_id == "007"  # YAML would read 7
    path.write_text(BASE + "run_id: 20261126\n")
    with pytest.raises(ConfigError, match=r"run_id: YAML reads the run_id as the number 20261126: quote it as you "
                                          r"wrote it, e.g. run_id: '20261126' \(unquoted, 007 reads as 7"):
        load_config(path)
    path.write_text(BASE + "run_id: 0700\n")  # the example is not the number YAML made of it ('448')
    with pytest.raises(ConfigError, match=r"as the number 448: quote it as you wrote it, e.g. run_id: '20261126' "
                                          r"\(unquoted, 007 reads as 7 and 0700 as the octal 448\)"):
        load_config(path)
    path.write_text(BASE + "run_id: '007'\n")
    assert load_config(path).run_id == "007"


def test_model_short_form(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nmodel: timm/convnext_tiny\n")
    assert load_config(path).model.arch == "timm/convnext_tiny"
    assert load_config(path, ["model=resnet18"]).model.arch == "resnet18"
