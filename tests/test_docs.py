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


def test_the_pyarrow_recipe_reads_runs_of_manifests_with_other_types(tmp_path: Path) -> None:
    """docs/cluster.md's pyarrow block, on two runs whose manifests wrote `label` as int8 and int64
    (the first with a column the second lacks): every row, the widest label, run ids as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "audits" / "results"
    runs = {"demo": pa.table({"pair_id": ["a", "b"], "label": pa.array([1, 0], pa.int8()), "rank": [1, 2]}),
            "20261129": pa.table({"pair_id": ["c"], "label": pa.array([None], pa.int64())})}
    for run_id, rows in runs.items():
        (root / "run_date=2026-11-29" / f"run_id={run_id}").mkdir(parents=True)
        pq.write_table(rows, root / "run_date=2026-11-29" / f"run_id={run_id}" / "part-0.parquet")
    text = (ROOT / "docs" / "cluster.md").read_text()
    recipe = re.search(r"```python\n(import pyarrow .*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(recipe.replace('"/data/audits/results"', repr(str(root))), namespace)
    table = namespace["table"]
    assert sorted(zip(table["run_id"].to_pylist(), table["pair_id"].to_pylist(), table["rank"].to_pylist())) == [
        ("20261129", "c", None), ("demo", "a", 1), ("demo", "b", 2)]
    assert table.schema.field("label").type == pa.int64() and table.schema.field("run_id").type == pa.string()
