"""The quality benchmark runs end to end on a few pairs, scores every method on every metric, and the
project's Grad-CAM agrees with pytorch-grad-cam's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobs.bench_quality import METHODS, METRICS, RANDOMISATION, UNIT_INTERVAL, main, write_section

pytestmark = pytest.mark.timeout(120)


def markdown_table(text: str, first_column: str) -> dict[str, dict[str, str]]:
    """The printed table whose header starts with `first_column`: row name -> column -> cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[start])
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        rows[row[0]] = dict(zip(header[1:], row[1:]))
    return rows


def test_smoke_run_scores_every_method_on_every_metric(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--smoke"]) == 0
    printed = capsys.readouterr().out

    scores = markdown_table(printed, "method")
    assert list(scores) == list(METHODS)
    for method, row in scores.items():
        assert list(row) == list(METRICS), method
        values = {metric: float(cell) for metric, cell in row.items()}
        assert all(math.isfinite(value) for value in values.values()), (method, values)
        for metric in UNIT_INTERVAL:
            assert 0.0 <= values[metric] <= 1.0, (method, metric, values[metric])
        assert -1.0 <= values[RANDOMISATION] <= 1.0, method

    (agreement,) = markdown_table(printed, "Grad-CAM agreement (min-max scaled, upsampled maps)").values()
    assert float(agreement["mean abs difference"]) < 1e-3
    assert float(agreement["max abs difference"]) < 2e-2
    assert float(agreement["correlation"]) > 0.999


def test_write_section_replaces_only_the_quality_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Speed\n\nkept\n")
    write_section(path, "## Quality\n\nfirst\n")
    assert path.read_text() == "# Benchmarks\n\n## Speed\n\nkept\n\n## Quality\n\nfirst\n"
    path.write_text(path.read_text().replace("## Speed\n\nkept\n\n", "") + "\n## Speed\n\nkept\n")
    write_section(path, "## Quality\n\nsecond\n")
    assert path.read_text() == "# Benchmarks\n\n## Quality\n\nsecond\n\n## Speed\n\nkept\n"
