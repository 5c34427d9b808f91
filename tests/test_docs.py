"""The docs say what the code does: the result columns and every config key with its default."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import JobConfig
from pipeline.schema import LOCALISATION_COLUMNS, PARTITION_COLUMNS, RESULT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def documented_columns() -> set[str]:
    """Column names in the first cell of each row of docs/cluster.md's result-column table."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    table = text[text.index("| column | type | |"):].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    names: set[str] = set()
    for row in rows[1:]:  # the first row is the manifest's columns, passed through
        names.update(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    return names


def test_the_column_table_is_the_schema() -> None:
    assert documented_columns() == set(RESULT_COLUMNS.names + LOCALISATION_COLUMNS.names + PARTITION_COLUMNS.names)


def readme_config() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Configuration"):]
    block = section[section.index("```yaml") + len("```yaml"):]
    return yaml.safe_load(block[: block.index("```")])


def test_the_readme_lists_every_config_key_with_its_default() -> None:
    documented = readme_config()
    required = {"manifest", "output", "run_id"}
    config = JobConfig.model_validate(documented)
    defaults = JobConfig.model_validate({"manifest": "m", "output": "o", "model": {"arch": "resnet50"}})
    dumped, default_dump = config.model_dump(mode="json"), defaults.model_dump(mode="json")
    assert set(documented) == set(default_dump)
    for section in ("model", "storage_options", "render_flags", "gates", "table"):
        assert set(documented[section]) == set(default_dump[section]), section
    for key in set(documented) - required - {"model"}:
        assert dumped[key] == default_dump[key], key  # the README shows the default
    for key in set(documented["model"]) - {"arch"}:
        assert dumped["model"][key] == default_dump["model"][key], f"model.{key}"
