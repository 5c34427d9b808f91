"""`sfam compare` on real runs: two models (different weights) over one manifest, on a local Ray.

The comparison's figures are checked against DuckDB over the two runs' result rows and
against numpy over their stored maps.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.comparison import (
    FALSE_MATCH_COUNTS,
    OTHER_IMAGES,
    REVERSED,
    _run_rows,
    compare_runs,
    pair_changes,
    run_record,
    write_comparison,
)
from pipeline.distributed.job import run_audit
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.io.stores import open_results_store
from pipeline.layout import comparison_dir
from pipeline.render.comparison_html import render_comparison
from pipeline.reporting import write_report
from pipeline.thresholds import MOVED_BELOW, recorded_false_match_similarity

from audit_data import job_config, model_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(600)
OPTIONS = StorageOptions()
ODD_PAIR_ID = '<i>q0</i>&"g"'  # drawn in the HTML: must come out escaped


@dataclass(frozen=True)
class Runs:
    root: Path
    output: str
    config: Path  # run B's job config


@pytest.fixture(scope="module")
def runs(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Run A, then run B with other weights, over one manifest; run C over other pairs at another input size."""
    root = str(tmp_path_factory.mktemp("compare"))
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")
    rng = np.random.default_rng(seed)
    manifest, rows = write_audit(root, OPTIONS, rng, queries=3, top_k=3, pair_ids=[ODD_PAIR_ID])
    for name, torch_seed in (("model-a.pt", 1), ("model-b.pt", 2)):
        torch.manual_seed(torch_seed)
        write_weights(join_uri(root, "models", name), OPTIONS)
    configs = {
        run_id: job_config(root, OPTIONS, manifest, run_id, render_png="none",
                           model=model_config(join_uri(root, "models", weights)) | extra)
        for run_id, weights, extra in (("run-a", "model-a.pt", {}), ("run-b", "model-b.pt", {}),
                                       ("run-c", "model-b.pt", {"input_size": 96}))
    }
    subset = join_uri(root, "subset.parquet")  # run C: the first 5 pairs of A and B, and one of its own
    duckdb.sql(f"COPY (SELECT * REPLACE (CASE WHEN pair_id = '{rows[5]['pair_id']}' THEN 'c-only' ELSE pair_id END AS pair_id) "
               f"FROM '{manifest}' LIMIT 6) TO '{subset}'")
    configs["run-c"] = configs["run-c"].model_copy(update={"manifest": subset})
    # run D: A's pair ids, the first three naming other reference images (a rank-shaped id in a new
    # manifest; the first also relabelled, as other images would be), the next two relabelled (a label
    # corrected between the nights)
    shifted = pq.read_table(manifest)
    references, labels = shifted["reference_uri"].to_pylist(), shifted["label"].to_pylist()
    references[:3] = references[1:3] + references[:1]
    labels[3:5] = [1 - label for label in labels[3:5]]
    labels[0] = 1 - labels[0]
    shifted = shifted.set_column(shifted.schema.get_field_index("reference_uri"), "reference_uri", pa.array(references))
    shifted = shifted.set_column(shifted.schema.get_field_index("label"), "label", pa.array(labels, shifted.schema.field("label").type))
    pq.write_table(shifted, join_uri(root, "shifted.parquet"))
    configs["run-d"] = configs["run-a"].model_copy(update={"manifest": join_uri(root, "shifted.parquet"), "run_id": "run-d"})
    for config in configs.values():
        run_audit(config)
    config_path = Path(root) / "run-b.yaml"
    config_path.write_text(yaml.safe_dump(configs["run-b"].model_dump(mode="json")))
    return Runs(Path(root), configs["run-a"].output, config_path)


def joined_runs(output: str, run_a: str, run_b: str) -> str:
    """SQL: the pairs ok in both runs, A's columns as a_*, B's as b_*."""
    def run(run_id: str, prefix: str) -> str:
        return (f"SELECT pair_id, label, similarity AS {prefix}sim, query_pointing_hit::DOUBLE AS {prefix}hit, "
                f"(query_energy_in_box::DOUBLE + reference_energy_in_box) / 2 AS {prefix}energy, map_query AS {prefix}mq, "
                f"map_reference AS {prefix}mr FROM read_parquet('{output}/results/*/run_id={run_id}/*.parquet') "
                "WHERE status = 'ok'")
    return (f"SELECT pair_id, b.label AS label, a.* EXCLUDE (pair_id, label), b.* EXCLUDE (pair_id, label) "
            f"FROM ({run(run_a, 'a_')}) a JOIN ({run(run_b, 'b_')}) b USING (pair_id)")


def approx(value: float | None) -> object:
    return None if value is None else pytest.approx(value, rel=1e-6, abs=1e-9)


def test_per_label_figures_match_duckdb(runs: Runs) -> None:
    joined = joined_runs(runs.output, "run-a", "run-b")
    threshold = duckdb.sql(f"SELECT median(b_sim) FROM ({joined}) WHERE label = 0").fetchall()[0][0]
    comparison = compare_runs(runs.output, "run-a", "run-b", OPTIONS, threshold=threshold)
    expected = duckdb.sql(
        f"SELECT label, count(*), avg(a_sim), avg(b_sim), avg(b_sim) - avg(a_sim), avg(a_hit), avg(b_hit), "
        f"avg(a_energy), avg(b_energy), count(*) FILTER (label = 0 AND a_sim >= {threshold}), "
        f"count(*) FILTER (label = 0 AND b_sim >= {threshold}) FROM ({joined}) GROUP BY ALL ORDER BY label DESC"
    ).fetchall()
    columns = ("label", "pairs", "mean_similarity_a", "mean_similarity_b", "mean_similarity_change", "pointing_hit_rate_a",
               "pointing_hit_rate_b", "energy_in_box_a", "energy_in_box_b", "false_matches_a", "false_matches_b")
    got = [tuple(row[c] for c in columns) for row in comparison.summary.to_pylist()]
    assert got == [tuple(approx(v) if isinstance(v, float) else v for v in row) for row in expected]
    assert sum(row[1] for row in expected) == 9 and comparison.summary["maps_not_comparable"].to_pylist() == [0] * len(got)
    assert comparison.summary["false_matches_b"].to_pylist()[-1] > 0  # label 0 comes last here: the median is a false match


def test_new_and_vanished_false_matches_are_the_set_differences(runs: Runs) -> None:
    joined = joined_runs(runs.output, "run-a", "run-b")
    t = duckdb.sql(f"SELECT median(s) FROM (SELECT a_sim AS s FROM ({joined}) UNION ALL SELECT b_sim FROM ({joined}))").fetchall()[0][0]
    comparison = compare_runs(runs.output, "run-a", "run-b", OPTIONS, threshold=t)

    def ids(where: str) -> set[str]:
        return {row[0] for row in duckdb.sql(f"SELECT pair_id FROM ({joined}) WHERE label = 0 AND {where}").fetchall()}

    view = comparison.view()
    assert {row["pair_id"] for row in view.new_false_matches} == ids(f"b_sim >= {t} AND a_sim < {t}")
    assert {row["pair_id"] for row in view.vanished_false_matches} == ids(f"a_sim >= {t} AND b_sim < {t}")
    label_0 = comparison.summary.filter(pc.equal(comparison.summary["label"], 0)).to_pylist()[0]
    assert label_0["false_matches_b"] == len(ids(f"b_sim >= {t}"))
    assert (label_0["new_false_matches"], label_0["vanished_false_matches"]) == (len(view.new_false_matches),
                                                                                len(view.vanished_false_matches))


def test_runs_whose_pair_ids_have_other_string_types_compare(runs: Runs, tmp_path: Path) -> None:
    """A manifest written with large_string ids (pandas with pyarrow strings, Spark) passes them
    through to its run's rows; the run before it had plain strings."""
    output = tmp_path / "audits"
    shutil.copytree(runs.output, output)
    for part in (output / "results").glob("run_date=*/run_id=run-b/*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.set_column(table.schema.get_field_index("pair_id"), "pair_id",
                                        pc.cast(table["pair_id"], pa.large_string())), part)
    comparison = compare_runs(str(output), "run-a", "run-b", OPTIONS)
    expected = compare_runs(runs.output, "run-a", "run-b", OPTIONS)
    assert comparison.pairs.to_pylist() == expected.pairs.to_pylist()


def test_map_correlations_match_numpy(runs: Runs) -> None:
    comparison = compare_runs(runs.output, "run-a", "run-b", OPTIONS)
    pairs = {row["pair_id"]: row for row in comparison.pairs.to_pylist()}
    maps = duckdb.sql(f"SELECT pair_id, a_mq, b_mq, a_mr, b_mr FROM ({joined_runs(runs.output, 'run-a', 'run-b')})").fetchall()
    assert len(maps) == len(pairs) == 9
    for pair_id, a_query, b_query, a_reference, b_reference in maps:
        for side, a_map, b_map in (("query", a_query, b_query), ("reference", a_reference, b_reference)):
            expected = np.corrcoef(np.float32(a_map), np.float32(b_map))[0, 1]
            got = pairs[pair_id][f"map_correlation_{side}"]
            assert (got is None and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-6), (pair_id, side)
    moved = [row["map_correlation"] for row in comparison.view().moved]
    correlations = [row["map_correlation"] for row in pairs.values() if row["map_correlation"] is not None]
    assert moved == sorted(c for c in correlations if c < MOVED_BELOW) and moved
    assert compare_runs(runs.output, "run-a", "run-a", OPTIONS).view().moved == []  # the same maps never moved


def test_other_pairs_and_map_shapes_are_counted_not_correlated(runs: Runs) -> None:
    comparison = compare_runs(runs.output, "run-a", "run-c", OPTIONS)
    assert comparison.counts == {"ok in both": 5, "only in A": 4, "only in B": 1, "with other images in B": 0,
                                   "relabelled in B": 0,
                                   "failed in A or B": 0, "with maps not comparable": 5, "with a constant map": 0}
    assert comparison.pairs.filter(comparison.pairs["map_comparable"]).num_rows == 0
    assert comparison.pairs["map_correlation"].null_count == comparison.pairs.num_rows
    assert sum(comparison.summary["maps_not_comparable"].to_pylist()) == 5
    c_only = comparison.pairs.filter(pc.equal(comparison.pairs["pair_id"], "c-only")).to_pylist()[0]
    assert (c_only["status_a"], c_only["status_b"], c_only["similarity_change"]) == (None, "ok", None)
    page = render_comparison(comparison.view())  # says why no map is listed, not that none moved
    assert "no maps compared: the 5 pairs ok in both runs have maps of other shapes" in page
    assert "no map moved" not in page
    assert [warning for warning in comparison.warnings if "map" in warning] == [  # and the terminal says why
        f"The runs' maps are of different input sizes (A: {comparison.runs[0]['input_size']}, B: 96 x 96 px): the map correlations and the changes of pointing "
        "and energy measure that difference, not a change of the model.",
        "5 pairs ok in both runs have maps of another shape in B (map_shape differs: another model, target layer or "
        "input size): no map correlation is taken for them."]


def test_a_pair_id_that_names_other_images_is_counted_not_compared(runs: Runs) -> None:
    comparison = compare_runs(runs.output, "run-a", "run-d", OPTIONS)
    a = {r["pair_id"]: r["reference_uri"] for r in pq.read_table(runs.root / "pairs.parquet").to_pylist()}
    d = {r["pair_id"]: r["reference_uri"] for r in pq.read_table(runs.root / "shifted.parquet").to_pylist()}
    changed = {pair_id for pair_id in a if a[pair_id] != d[pair_id]}
    assert changed and comparison.counts["with other images in B"] == len(changed)
    relabelled = [row["pair_id"] for row in comparison.pairs.to_pylist() if row["relabelled"]]
    assert comparison.counts["relabelled in B"] == len(relabelled) == 2 and not changed & set(relabelled)
    assert comparison.counts["ok in both"] == len(a) - len(changed)  # the same model: every other pair is ok
    same = dict(zip(comparison.pairs["pair_id"].to_pylist(), comparison.pairs["same_images"].to_pylist()))
    assert {pair_id for pair_id, flag in same.items() if flag is False} == changed
    assert sum(comparison.summary["pairs"].to_pylist()) == len(a) - len(changed)
    for row in comparison.pairs.filter(pc.invert(comparison.pairs["same_images"])).to_pylist():
        assert row["map_correlation"] is None  # maps of other pictures are not correlated
    assert not any(line.startswith("warning:") for line in comparison.lines())
    view = comparison.view()  # the page lists them, not only counts them
    assert sorted(row["pair_id"] for row in view.relabelled) == sorted(relabelled)
    assert {row["pair_id"] for row in view.other_images} == changed
    page = render_comparison(view)
    for pair_id in (*relabelled, *changed):
        assert html.escape(pair_id) in page
    assert 'id="relabelled"' in page and 'id="other-images"' in page
    # nightly manifests in folders of their own, with relative URIs: every pair names other images
    others = replace(comparison, pairs=comparison.pairs.filter(pc.invert(comparison.pairs["same_images"])),
                     summary=comparison.summary.slice(0, 0))
    assert f"warning: {OTHER_IMAGES}" in others.lines()  # not just an empty table
    assert html.escape(OTHER_IMAGES) in render_comparison(others.view())


def test_runs_named_in_the_reverse_order_are_compared_with_a_warning(runs: Runs) -> None:
    backwards = compare_runs(runs.output, "run-b", "run-a", OPTIONS)
    assert f"warning: {REVERSED}" in backwards.lines()
    assert html.escape(REVERSED) in render_comparison(backwards.view())
    forwards = compare_runs(runs.output, "run-a", "run-b", OPTIONS)
    assert REVERSED not in "\n".join(forwards.lines()) and html.escape(REVERSED) not in render_comparison(forwards.view())


def test_maps_of_another_layer_or_weighting_are_compared_with_a_warning(runs: Runs, tmp_path: Path) -> None:
    """Maps of layer3 against layer4 (both 16 x 16) correlated 0.93 without a word: a reader took the
    difference for drift of the model."""
    output = tmp_path / "audits"
    shutil.copytree(runs.output, output)
    size = json.loads((output / "runs" / "run-a" / "run.json").read_text())["config"]["model"]["input_size"]
    edit_record(output, "run-b", lambda record: record["config"]["model"].update(input_size=[size, size]))
    assert not compare_runs(str(output), "run-a", "run-b", OPTIONS).warnings  # 64 and [64, 64] are one size
    edit_record(output, "run-b", lambda record: record.update(target_layer="<b>layer3</b>"))
    edit_record(output, "run-b", lambda record: record["config"]["model"].update(weighting="matched"))
    comparison = compare_runs(str(output), "run-a", "run-b", OPTIONS)
    layer_a = comparison.runs[0]["target_layer"]
    assert [line for line in comparison.lines() if line.startswith("warning: ")] == [
        f"warning: The runs' maps are of different target layers (A: {layer_a}, B: <b>layer3</b>): the map correlations "
        "and the changes of pointing and energy measure that difference, not a change of the model.",
        "warning: The runs' maps are of different weightings (A: cis, B: matched): the map correlations and the changes "
        "of pointing and energy measure that difference, not a change of the model."]
    page = render_comparison(comparison.view())
    assert "B: &lt;b&gt;layer3&lt;/b&gt;)" in page and "<b>layer3" not in page  # a record's text is escaped


def test_an_image_replaced_at_its_uri_between_the_runs_is_another_image(runs: Runs) -> None:
    """Same URIs, other bytes (the recorded SHA-256 differ): not the same images; a run without the
    digests (made before the job recorded them) is compared by its URIs."""
    store = open_results_store(runs.output, OPTIONS)
    a = _run_rows(store, run_record(store, "run-a"))
    digests = a["query_sha256"].to_pylist()
    assert all(len(digest) == 64 for digest in digests)
    replaced = a.set_column(a.schema.get_field_index("query_sha256"), "query_sha256", pa.array(["0" * 64] + digests[1:]))
    same = pair_changes(a, replaced, None)["same_images"].to_pylist()
    assert same == [False] + [True] * (a.num_rows - 1)
    older = a.set_column(a.schema.get_field_index("query_sha256"), "query_sha256", pa.nulls(a.num_rows, pa.string()))
    assert pair_changes(older, replaced, None)["same_images"].to_pylist() == [True] * a.num_rows


def test_written_tables_read_in_duckdb_and_the_page_has_every_section(runs: Runs) -> None:
    written = write_comparison(compare_runs(runs.output, "run-a", "run-b", OPTIONS), runs.output, OPTIONS)
    assert set(written.values()) == {join_uri(comparison_dir(runs.output, "run-a", "run-b"), name)
                                     for name in ("summary.parquet", "pairs.parquet", "comparison.html")}
    summary = duckdb.sql(f"SELECT run_a, run_b, attempt_a, attempt_b, threshold, sum(pairs) "
                         f"FROM '{written['summary.parquet']}' GROUP BY ALL")
    attempts = [json.loads((Path(runs.output) / "runs" / run / "_SUCCESS").read_text())["attempt"] for run in ("run-a", "run-b")]
    assert summary.fetchall() == [("run-a", "run-b", *attempts, 0.8, 9)]  # which attempts it describes
    assert duckdb.sql(f"SELECT count(*), count(map_correlation) FROM '{written['pairs.parquet']}'").fetchall()[0][0] == 9
    pairs = duckdb.sql(f"SELECT DISTINCT run_a, run_b, attempt_a, attempt_b, threshold FROM '{written['pairs.parquet']}'")
    assert pairs.fetchall() == [("run-a", "run-b", *attempts, 0.8)]  # each row says what its false_match_* mean
    page = Path(written["comparison.html"]).read_text()
    assert "<th>weighting</th>" in page and "<th>input size</th>" in page  # what changed between the runs, if it did
    for section in ('id="comparison"', 'id="by-label"', 'id="moved-maps"', 'id="new-false-matches"',
                    'id="vanished-false-matches"', "run-a", "run-b", "model-a.pt (sha256 ", "model-b.pt (sha256 "):
        assert section in page  # the weights tell two checkpoints of one architecture apart
    assert ODD_PAIR_ID not in page and "&lt;i&gt;q0&lt;/i&gt;&amp;&quot;g&quot;" in page


def test_the_later_runs_report_compares_with_the_earlier_run(runs: Runs, tmp_path: Path) -> None:
    pages = {run_id: tmp_path / f"{run_id}.html" for run_id in ("run-a", "run-b", "run-c")}
    for run_id, page in pages.items():
        write_report(runs.output, run_id, OPTIONS, str(page))
    later = pages["run-b"].read_text()
    assert "Compared with run-a" in later and later.index('id="comparison"') < later.index('id="gallery"')
    attempt_a = json.loads((Path(runs.output) / "runs" / "run-a" / "_SUCCESS").read_text())["attempt"]
    assert "<th>attempt</th>" in later and f">{attempt_a}<" in later  # a re-run of run-a does not rewrite this page
    assert 'id="comparison"' not in pages["run-a"].read_text()  # no earlier run
    assert 'id="comparison"' not in pages["run-c"].read_text()  # another manifest


def edit_record(output: Path, run_id: str, edit: Callable[[dict], object]) -> dict:
    """Rewrites run_id's run.json under `output` with `edit` applied to it; returns the new record."""
    path = output / "runs" / run_id / "run.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return record


def test_a_nightly_run_of_a_new_manifest_is_compared_as_its_gate_compares(runs: Runs, tmp_path: Path) -> None:
    """similarity_baseline: previous_run (a new manifest each night): the report compares with the
    previous run of any manifest, as the similarity gate does."""
    output = tmp_path / "audits"
    shutil.copytree(runs.output, output)
    edit_record(output, "run-c", lambda record: record["config"]["gates"].update(similarity_baseline="previous_run"))
    page = tmp_path / "run-c.html"
    write_report(str(output), "run-c", OPTIONS, str(page))
    assert "Compared with run-b" in page.read_text()
    # a run that broke its gates is not the gate's baseline, nor the report's
    edit_record(output, "run-b", lambda record: record.update(status="gates_failed"))
    write_report(str(output), "run-c", OPTIONS, str(page))
    assert "Compared with run-a" in page.read_text()


def test_a_re_run_baseline_shows_when_it_first_ran(runs: Runs, tmp_path: Path) -> None:
    """A re-run of run A (a later attempt) showed its attempt's start, after run B's: A, "the earlier",
    looked later. Runs are placed by when they first ran, as the baseline is chosen."""
    output = tmp_path / "audits"
    shutil.copytree(runs.output, output)
    edit_record(output, "run-a", lambda record: record["timings"].update(started="2099-01-01T00:00:00+00:00",
                                                                          first_started="2026-11-26T03:00:00+00:00"))
    run_a, _ = compare_runs(str(output), "run-a", "run-b", OPTIONS).view().runs
    assert run_a["started"] == "2026-11-26T03:00:00+00:00"


def test_a_euclidean_run_beyond_its_threshold_counts_no_false_matches(runs: Runs, tmp_path) -> None:
    """A euclidean run's default false_match_similarity (0.8) is above every similarity it has: the
    comparison counts none (null, not 0) and says why, as the report's Look first does."""
    output = tmp_path / "audits"
    shutil.copytree(runs.output, output)
    record = edit_record(output, "run-b", lambda record: record["config"]["model"].update(metric="euclidean"))
    assert recorded_false_match_similarity(record) is None
    comparison = compare_runs(str(output), "run-a", "run-b", OPTIONS)
    assert comparison.threshold is None and comparison.pairs["false_match_b"].null_count == comparison.pairs.num_rows
    assert all(row[name] is None for row in comparison.summary.to_pylist() for name in FALSE_MATCH_COUNTS)
    assert "false matches: none counted: the run's false_match_similarity is above every euclidean similarity" in (
        "\n".join(comparison.lines()))
    assert compare_runs(str(output), "run-a", "run-b", OPTIONS, threshold=-0.5).summary["false_matches_b"].null_count == 0


def test_the_page_says_why_no_map_is_listed() -> None:
    from pipeline.render.comparison_html import _no_map_moved

    assert _no_map_moved({"ok in both": 0, "with maps not comparable": 0}).startswith("no maps compared: no pair is ok")
    assert _no_map_moved({"ok in both": 5, "with maps not comparable": 5}).startswith("no maps compared: the 5 pairs")
    assert _no_map_moved({"ok in both": 5, "with maps not comparable": 2}).startswith("no map moved")
    # 1-cell or constant maps have no correlation: not said to be unmoved
    assert _no_map_moved({"ok in both": 5, "with maps not comparable": 2, "with a constant map": 3}) == (
        "no maps compared: 2 pairs have maps of other shapes; 3 pairs have a constant map in A or B (one cell, "
        "or the same value everywhere), which no correlation describes")
    assert _no_map_moved({"ok in both": 5, "with maps not comparable": 0, "with a constant map": 1}).startswith(
        "no map moved: every correlated pair's maps correlate at or above 0.99; 1 pair has a constant map")


def test_cli(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "run-a", "run-b", "--config", str(runs.config), "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "compared run-a (A) with run-b (B)" in out and "false matches: label 0 and similarity at or above 0.5" in out
    lines = out.splitlines()
    header, wrote = (next(i for i, line in enumerate(lines) if line.startswith(start)) for start in ("label ", "wrote "))
    assert lines[header + 1:wrote] and all(line.startswith(("different", "same", "unlabelled"))
                                           for line in lines[header + 1:wrote])  # the table's rows, nothing between
    assert f"wrote {comparison_dir(runs.output, 'run-a', 'run-b')}/comparison.html" in out
    assert main(["compare", runs.output, "run-a", "run-b"]) == 0  # OUTPUT instead of --config
    capsys.readouterr()
    assert main(["compare", runs.output, "run-a", "nightly-404"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nightly-404'" in err
    assert main(["compare", runs.output, "run-a", "run-b", "--threshold", "80"]) == 2  # a percentage, not a cosine
    assert "--threshold 80 is outside cosine similarity's range [-1, 1]" in capsys.readouterr().err


def test_means_leave_out_nan_as_the_gates_do() -> None:
    """energy_in_box is NaN for a map without positive mass: one such pair made a label's mean NaN."""
    from pipeline.comparison import _mean

    assert _mean(pa.chunked_array([[0.2, float("nan"), None], [0.4]])) == pytest.approx(0.3)
    assert _mean(pa.chunked_array([[float("nan"), None]])) is None


def test_a_change_is_measured_on_the_pairs_both_runs_have_a_figure_for() -> None:
    """A pair's energy is NaN, and its pointing null, where its map has no positive evidence: the
    means of A and B must cover the same pairs, or "A -> B" compares two different subsets."""
    from pipeline.comparison import _paired_means

    a = pa.chunked_array([[0.9, 0.8, float("nan"), None, 0.1]])
    b = pa.chunked_array([[0.5, float("nan"), 0.2, 0.3, 0.3]])
    assert _paired_means(a, b) == pytest.approx((0.5, 0.4))  # pairs 0 and 4 only
    hits_a, hits_b = pa.chunked_array([[True, None, False]]), pa.chunked_array([[None, True, True]])
    assert _paired_means(hits_a, hits_b) == pytest.approx((0.0, 1.0))
    assert _paired_means(pa.chunked_array([[None, 0.2]]), pa.chunked_array([[0.1, None]])) == (None, None)
