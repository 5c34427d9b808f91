"""The quality benchmark runs end to end on a few pairs for the demo CNN and the demo ViT, scores every
method on every metric, compares the ViT's target layers, and the project's Grad-CAM agrees with
pytorch-grad-cam's."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest

from jobs.bench_quality import METRICS, RANDOMISATION, SUBJECTS, UNIT_INTERVAL, main, write_section

pytestmark = pytest.mark.timeout(600)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_tables(text: str, first_column: str) -> list[dict[str, dict[str, str]]]:
    """Every printed table whose header starts with `first_column`: row name -> column -> cell."""
    lines = text.splitlines()
    tables = []
    for start in (i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |")):
        header, rows = cells(lines[start]), {}
        for line in lines[start + 2 :]:
            if not line.startswith("|"):
                break
            row = cells(line)
            rows[row[0]] = dict(zip(header[1:], row[1:]))
        tables.append(rows)
    return tables


@pytest.fixture(scope="module")
def printed() -> str:
    """What one smoke run (both models) prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--smoke"]) == 0
    return out.getvalue()


def test_smoke_run_scores_every_method_of_every_model_on_every_metric(printed: str) -> None:
    tables = markdown_tables(printed, "method")
    assert [list(table) for table in tables] == [list(subject.methods) for subject in SUBJECTS.values()]
    for scores in tables:
        for method, row in scores.items():
            assert list(row) == list(METRICS), method
            values = {metric: float(cell) for metric, cell in row.items()}
            assert all(math.isfinite(value) for value in values.values()), (method, values)
            for metric in UNIT_INTERVAL:
                assert 0.0 <= values[metric] <= 1.0, (method, metric, values[metric])
            assert -1.0 <= values[RANDOMISATION] <= 1.0, method


def test_project_gradcam_agrees_with_pytorch_grad_cam_on_the_cnn(printed: str) -> None:
    (table,) = markdown_tables(printed, "Grad-CAM agreement (min-max scaled, upsampled maps)")
    (agreement,) = table.values()
    assert float(agreement["mean abs difference"]) < 1e-3
    assert float(agreement["max abs difference"]) < 2e-2
    assert float(agreement["correlation"]) > 0.999


def test_vit_target_layers_are_compared_and_the_default_is_marked(printed: str) -> None:
    vit = SUBJECTS["vit"]
    (sweep,) = markdown_tables(printed, "target layer")
    assert [name.split()[0].strip("`") for name in sweep] == list(vit.sweep)
    marked = {name.split()[0].strip("`"): name for name in sweep}
    assert "benchmarked" in marked[vit.target_layer] and "default" in marked[vit.target_layer]
    for row in sweep.values():
        assert all(math.isfinite(float(cell)) for cell in row.values())
    targets = markdown_tables(printed, "target")
    assert len(targets) == len(SUBJECTS) and all(targets)


def test_write_section_replaces_only_the_quality_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Speed\n\nkept\n")
    write_section(path, "## Quality\n\nfirst\n")
    assert path.read_text() == "# Benchmarks\n\n## Speed\n\nkept\n\n## Quality\n\nfirst\n"
    path.write_text(path.read_text().replace("## Speed\n\nkept\n\n", "") + "\n## Speed\n\nkept\n")
    write_section(path, "## Quality\n\nsecond\n")
    assert path.read_text() == "# Benchmarks\n\n## Quality\n\nsecond\n\n## Speed\n\nkept\n"
