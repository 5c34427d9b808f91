"""The audit job's configuration: YAML plus `--set key=value` overrides (every key: README, Configuration)."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError, did_you_mean
from pipeline.gates import Gates
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.storage import StorageOptions, resolve_uri, without_credentials
from pipeline.models.spec import ModelSpec
from pipeline.render.selection import FlagRules, RenderPolicy
from pipeline.thresholds import FALSE_MATCH_SIMILARITY, outside_cosine_range

MAX_IMAGE_PIXELS = 50_000_000  # larger images fail their row (decompression bombs)
ACTOR_MEMORY_AT_LEAST = 64 * 2**20  # bytes: a model replica needs more (torch alone takes hundreds of MiB)
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: `$` would let a final newline through
RUN_ID_RULE = "run_id may hold letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit"
Model = TypeVar("Model", bound=BaseModel)


class ConfigError(UserError):
    """The configuration file or an override is invalid."""


class _PlainLoader(yaml.SafeLoader):
    """YAML without implicit dates (`run_id: 2026-11-26` is the string it looks like) and
    without silent duplicate keys (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"line {key.start_mark.line + 1}: key {key.value!r} appears twice in one mapping")
            seen.add(key.value)
        return super().construct_mapping(node, deep)


_PlainLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """YAML as the config reads it (_PlainLoader)."""
    return yaml.load(text, Loader=_PlainLoader)


def default_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%dT%H%M%SZ")


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: str
    output: str
    run_id: str = Field(default_factory=default_run_id)
    model: ModelSpec
    batch_size: int | None = Field(None, ge=1, le=4096)  # None: 128 where the actors hold GPUs, else 32
    rows_per_file: int = Field(256, ge=1, le=10_000_000)  # result rows per Parquet file, at least
    num_actors: int | None = Field(None, ge=1)  # None: the cluster's GPUs / gpus_per_actor at the start, else 2
    gpus_per_actor: float | None = Field(None, ge=0)
    actor_memory: ByteSize | None = None  # memory Ray reserves per replica ("6GiB"); None: none
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)
    # pillow: JPEGs decoded in the fetch tasks; torchvision: in the explain actors, on their device
    # (nvJPEG on a GPU); auto: torchvision where the actors hold GPUs
    jpeg_decoder: Literal["auto", "pillow", "torchvision"] = "auto"
    max_error_fraction: float = Field(0.01, ge=0, le=1)
    render_png: RenderPolicy = "flagged"
    render_flags: FlagRules = Field(default_factory=FlagRules)
    gates: Gates = Field(default_factory=Gates)
    table: TableConfig = Field(default_factory=TableConfig)
    storage_options: StorageOptions = Field(default_factory=StorageOptions)

    @field_validator("render_png", mode="before")
    @classmethod
    def _render_png_bool(cls, value: Any) -> Any:
        """The earlier boolean form: true renders all pairs, false none."""
        return {True: "all", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("actor_memory")
    @classmethod
    def _actor_memory_with_a_unit(cls, value: ByteSize | None) -> ByteSize | None:
        """`actor_memory: 6` is 6 bytes, surely meant as 6 GiB: less than a replica can need is refused."""
        if value is not None and value < ACTOR_MEMORY_AT_LEAST:
            raise ValueError(f"{int(value)} bytes is less than a model replica needs (a bare number is bytes): give a "
                             f"size with its unit, e.g. 6GiB")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_short_form(cls, value: Any) -> Any:
        return model_section(value)

    @field_validator("run_id", mode="before")
    @classmethod
    def _quoted_run_id(cls, value: Any) -> Any:
        """A YAML file's `run_id: 20261126` is a number to YAML, whose own text is lost (007 is 7)."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f"YAML reads the run_id as the number {value!r}: quote it as you wrote it, e.g. "
                             "run_id: '20261126' (unquoted, 007 reads as 7 and 0700 as the octal 448)")
        return value

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str) -> str:
        if not RUN_ID_PATTERN.fullmatch(value):
            raise ValueError(RUN_ID_RULE)
        return value

    @field_validator("manifest", "output")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        return without_credentials(value)

    @model_validator(mode="after")
    def _paths_from_current_directory(self) -> JobConfig:
        """Relative local paths (manifest, output, weights) are read from the current directory: made
        absolute here, where the config is read, they lead every Ray worker to the same files."""
        here = os.getcwd()
        self.manifest, self.output = _without_trailing_slash(resolve_uri(self.manifest, here)), resolve_uri(self.output, here)
        if self.model.weights:
            self.model = self.model.model_copy(update={"weights": resolve_uri(self.model.weights, here)})
        return self

    @model_validator(mode="after")
    def _output_outside_the_manifest(self) -> JobConfig:
        """An output inside a folder manifest would be read as part of the manifest by the next run."""
        manifest, output = self.manifest.rstrip("/"), self.output.rstrip("/")
        if output == manifest or output.startswith(f"{manifest}/"):
            raise ValueError(f"output {output} is inside the manifest folder {manifest}: a later run would read the "
                             "job's files as manifest files; write the output elsewhere")
        return self

    @model_validator(mode="before")
    @classmethod
    def _one_false_match_threshold(cls, data: Any) -> Any:
        """The gate and the render flags count false matches at one similarity: set it in either
        (a config written out in full holds both, one of them at the default)."""
        if not isinstance(data, dict):
            return data
        sections = {name: data.get(name) or {} for name in ("gates", "render_flags")}
        given = {section.get("false_match_similarity") for section in sections.values()
                 if isinstance(section, dict)} - {None, FALSE_MATCH_SIMILARITY}
        if len(given) > 1:
            raise ValueError("gates.false_match_similarity and render_flags.false_match_similarity differ: "
                             "false matches are counted at one similarity, set it once")
        if not given:
            return data
        threshold = given.pop()
        return {**data, **{name: {**section, "false_match_similarity": threshold}
                           for name, section in sections.items() if isinstance(section, dict)}}

    @model_validator(mode="after")
    def _gates_have_meaning(self) -> JobConfig:
        if self.gates.max_residual_share is not None and self.model.metric == "euclidean":
            raise ValueError("gates.max_residual_share does not apply to metric euclidean, whose residual holds "
                             "-1/2 |u^y|^2 by construction (docs/method.md): remove the gate or use cosine or dot")
        outside = outside_cosine_range(self.gates.false_match_similarity, self.model.metric)
        if outside:
            raise ValueError(f"false_match_similarity {outside}")
        if (self.gates.max_false_match_rate is not None and self.model.metric == "euclidean"
                and self.gates.false_match_similarity > 0):
            raise ValueError(f"gates.false_match_similarity {self.gates.false_match_similarity:g} is above every "
                             "euclidean similarity (-1/2 |u - v|^2 <= 0), so the false-match gate could never fail: "
                             "set it in the metric's units, e.g. -0.5")
        return self


class _PartOfJobConfig(BaseModel):
    """Some keys of a job config, read by a command that needs no more; the others are left unread,
    but a key that no job config has (a typo), or credentials in its manifest or output URI, are
    refused as JobConfig refuses them."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _a_job_config(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = [key for key in data if key not in JobConfig.model_fields]
        if unknown:
            raise ValueError(f"{unknown[0]}: not a key of a job config"
                             + did_you_mean(str(unknown[0]), JobConfig.model_fields, n=1))
        for key in ("manifest", "output"):
            if isinstance(data.get(key), str):
                try:
                    without_credentials(data[key])
                except ValueError as error:
                    raise ValueError(f"{key}: {error}") from None
        return data


class FinishedRunSettings(_PartOfJobConfig):
    """What a command on a finished run (report, render, compare) reads of a job config: where the
    run lives. The rest (the manifest, which a nightly config may leave to `--set`) is not read."""

    output: str
    table: TableConfig = Field(default_factory=TableConfig)
    storage_options: StorageOptions = Field(default_factory=StorageOptions)

    @field_validator("output")
    @classmethod
    def _from_current_directory(cls, value: str) -> str:
        return resolve_uri(value, os.getcwd())


class PairSettings(_PartOfJobConfig):
    """What `sfam explain` reads of a job config: the model, the storage options and the image size limit."""

    model: ModelSpec
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)
    storage_options: StorageOptions = Field(default_factory=StorageOptions)

    @field_validator("model", mode="before")
    @classmethod
    def _model_short_form(cls, value: Any) -> Any:
        return model_section(value)


def _without_trailing_slash(uri: str) -> str:
    """A folder manifest written with a trailing slash is the same manifest (its relative URIs'
    folder, the similarity gate's baseline); a bucket or filesystem root keeps its slash."""
    stripped = uri.rstrip("/")
    return stripped if "/" in stripped.split("://", 1)[-1] else uri


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.metric=dot' -> (['model', 'metric'], 'dot'); the value is read as YAML, but a run_id
    is always the text as given (`run_id=20261126` is not a number, `run_id=007` keeps its zeros)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. model.metric=dot")
    if key.strip() == "run_id":
        return ["run_id"], value.strip()
    try:
        return key.strip().split("."), load_yaml(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not YAML: {one_line(error)}") from error


def model_section(value: Any) -> Any:
    """`model: resnet18` is `model: {arch: resnet18}`, as `sfam explain --model resnet18` is."""
    return {"arch": value} if isinstance(value, str) else value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "model" and len(path) > 1 and "model" in data:  # `--set model.metric=dot` on `model: resnet50`
            data["model"] = model_section(data["model"])
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
        replaced = node.get(path[-1])
        if isinstance(replaced, dict) and replaced and not isinstance(value, dict):  # the weights went with `model=ARCH`
            key = ".".join(path)
            raise ConfigError(f"--set {text!r} would replace the whole {key} section ({', '.join(replaced)}): set one of "
                              f"its keys, e.g. --set {key}.{next(iter(replaced))}={text.partition('=')[2].strip()}")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[Model] = JobConfig) -> Model:
    """Reads a YAML file (or nothing), applies overrides, validates as `schema`. Unknown keys are
    errors (where `schema` forbids them: JobConfig does)."""
    data: dict = {}
    if path is not None:
        try:
            data = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {error.start}); a config is a YAML "
                              "file, saved as UTF-8") from error
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config {path}: {one_line(error)}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    return validated(schema, apply_overrides(data, list(overrides)), "invalid config")


def one_line(error: Exception) -> str:
    """The error's message on one line (YAML errors span several)."""
    return " ".join(str(error).split())


def validated(schema: type[Model], data: Any, what: str) -> Model:
    """`schema` validated from `data`, or a ConfigError `what: key: problem; ...` on one line."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{what}: {'; '.join(_problem(e, schema) for e in error.errors())}") from error


def _problem(error: Mapping[str, Any], schema: type[BaseModel]) -> str:
    """One validation error as `key: message`; an unknown key names the closest known one."""
    *parents, name = error["loc"] or ("",)
    # a validator's own ValueError without pydantic's "Value error, "; a whole-config check has no key
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    text = f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message
    if error["type"] != "extra_forbidden":
        return text
    model: Any = schema
    for parent in parents:  # the model that holds the unknown key
        annotation = model.model_fields[parent].annotation if parent in getattr(model, "model_fields", {}) else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            return text
    return text + did_you_mean(str(name), model.model_fields, n=1, prefix="".join(f"{p}." for p in parents))

