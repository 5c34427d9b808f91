"""`sfam demo` end to end on a small audit: job, DuckDB query, report."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.demo.job import run_demo, write_demo_audit


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    run_demo(str(tmp_path), queries=6, top_k=3)
    printed = capsys.readouterr().out
    assert "run demo: 18 pairs, 18 ok, 0 error" in printed
    assert "same digit" in printed and "query_energy_in_box" in printed  # the DuckDB table
    report = tmp_path / "audits" / "reports" / "demo.html"
    assert report.exists() and report.read_text().count('class="card') >= 18
    assert len(list((tmp_path / "audits" / "png" / "run_id=demo").rglob("*.png"))) == 18


def test_demo_rewrites_its_own_output_with_the_same_settings(tmp_path) -> None:
    first = write_demo_audit(str(tmp_path), queries=3, top_k=2)[1].read_text()
    manifest = (tmp_path / "data" / "pairs.parquet").read_bytes()
    _, config_path = write_demo_audit(str(tmp_path), queries=3, top_k=2)  # make demo, twice
    assert config_path.read_text() == first and (tmp_path / "data" / "pairs.parquet").read_bytes() == manifest


def _files(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(("prepare", "named"), [
    (lambda root: write_demo_audit(str(root), queries=3, top_k=2), "holds a demo of 3 queries x top-2"),
    (lambda root: (root / "data").mkdir() or (root / "data" / "pairs.parquet").write_bytes(b"mine"),
     "holds files without the demo's demo.json"),
    (lambda root: (root / "audit.yaml").write_text("run_id: mine\n"), "audit.yaml is not the demo's config"),
])
def test_demo_refuses_to_replace_what_it_did_not_write(tmp_path, prepare, named) -> None:
    prepare(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=named):
        write_demo_audit(str(tmp_path), queries=4, top_k=2)
    assert _files(tmp_path) == before


def test_an_edited_demo_config_is_kept(tmp_path) -> None:
    _, config_path = write_demo_audit(str(tmp_path), queries=3, top_k=2)
    config_path.write_text(config_path.read_text().replace("metric: cosine", "metric: dot"))
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="audit.yaml is not the demo's config"):
        write_demo_audit(str(tmp_path), queries=3, top_k=2)
    assert _files(tmp_path) == before
