"""`sfam demo` end to end on a small audit: job, DuckDB query, report."""

from __future__ import annotations

import pytest

from pipeline.demo.job import run_demo


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    assert run_demo(str(tmp_path), queries=6, top_k=3) == 0
    printed = capsys.readouterr().out
    assert "run demo: 18 pairs, 18 ok, 0 error" in printed
    assert "same digit" in printed and "query_energy_in_box" in printed  # the DuckDB table
    report = tmp_path / "audits" / "reports" / "demo.html"
    assert report.exists() and report.read_text().count('class="card') >= 18
    assert len(list((tmp_path / "audits" / "png" / "run_id=demo").rglob("*.png"))) == 18
