"""Quality gates on real runs: a passing run, a run that breaks gates (committed, recorded, exit 3)."""

from __future__ import annotations

import re

import duckdb
import pytest
import yaml

from pipeline.cli import main
from pipeline.comparison import compare_runs
from pipeline.errors import EXIT_GATES_FAILED, UserError
from pipeline.gates import Gates, check_manifest_supports
from pipeline.io.storage import StorageOptions, exists, join_uri
from pipeline.io.tables import read_json

from audit_data import job_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(400)


def gate_values(record: dict) -> dict[str, tuple[float | None, bool]]:
    return {g["name"]: (g["value"], g["passed"]) for g in record["gates"]}


def test_gates_pass_then_fail_with_exit_3(local_ray, tmp_path, rng, capsys) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=3, top_k=4)
    lenient = {"min_same_label_pointing": 0.0, "max_false_match_rate": 1.0, "max_residual_share": 1e6,
               "max_similarity_drop": 2.0}
    config = job_config(root, options, manifest, "week-1", gates=lenient)
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["audit", "--config", str(path)]) == 0
    first = read_json(join_uri(config.output, "runs", "week-1", "run.json"), options)
    assert first["status"] == "succeeded" and all(passed for _, passed in gate_values(first).values())
    assert gate_values(first)["max_similarity_drop"][0] is None  # no earlier run of the manifest to compare with

    strict = ["--set", "run_id=week-2", "--set", "gates.false_match_similarity=-1.0",
              "--set", "gates.max_false_match_rate=0.0", "--set", "gates.max_similarity_drop=-1.0"]
    assert main(["audit", "--config", str(path), *strict]) == EXIT_GATES_FAILED
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1].startswith("gates failed: gate max_false_match_rate")
    assert f"run week-2: {len(rows)} pairs, {len(rows)} ok, 0 error" in printed.out  # it committed: its summary too
    second = read_json(join_uri(config.output, "runs", "week-2", "run.json"), options)
    values = gate_values(second)
    assert second["status"] == "gates_failed"
    assert second["reason"].startswith("gate max_false_match_rate: ") and "max_similarity_drop" in second["reason"]
    assert first["reason"] is None
    assert exists(join_uri(config.output, "runs", "week-2", "_SUCCESS"), options)  # the outputs are finished
    different = sum(r["label"] == 0 for r in rows)
    assert values["max_false_match_rate"] == (1.0, False) and different > 0  # every label-0 pair is >= -1
    assert values["max_similarity_drop"][1] is False
    # the drop is against week-1 (same manifest and model): the same similarities, up to rounding
    assert abs(values["max_similarity_drop"][0]) < 1e-5
    table = f"read_parquet('{config.output}/results/*/*/*.parquet', hive_partitioning = true, union_by_name = true)"
    pointing = duckdb.sql(f"SELECT avg(query_pointing_hit::DOUBLE) FROM {table} "
                          f"WHERE run_id = 'week-2' AND status = 'ok' AND label = 1").fetchall()[0][0]
    assert values["min_same_label_pointing"][0] == pytest.approx(pointing)
    notes = {g["name"]: g["note"] for g in second["gates"]}
    same = [r for r in rows if r["label"] == 1]
    mean = duckdb.sql(f"SELECT avg(similarity) FROM {table} WHERE run_id = 'week-1' AND status = 'ok' AND label = 1").fetchall()[0][0]
    # each run's mean and count: two sets of pairs where the manifests differ (previous_run)
    assert re.fullmatch(rf"against run week-1: {mean:.4f} over its {len(same)} ok label-1 pairs, "
                        rf"\d\.\d{{4}} over this run's {len(same)}", notes["max_similarity_drop"])
    # compared later, false matches are counted at the later run's own threshold, as its gate counted them
    assert compare_runs(config.output, "week-1", "week-2", options).threshold == -1.0

    # a scheduled audit of a new manifest each night: compared with the previous run, of the same metric only
    nightly = str(tmp_path / "2026-11-27.parquet")
    duckdb.sql(f"COPY (SELECT * FROM '{manifest}') TO '{nightly}'")
    # week-2 broke its gates: no baseline, or a drop would alert once, then pass against itself
    for run_id, metric, against in (("night-1", "cosine", "against run week-1"),
                                     ("night-2", "dot", "no earlier successful run under this output with metric dot to compare with")):
        main(["audit", "--config", str(path), "--set", f"run_id={run_id}", "--set", f"manifest={nightly}",
              "--set", f"model.metric={metric}", "--set", "gates.similarity_baseline=previous_run"])
        record = read_json(join_uri(config.output, "runs", run_id, "run.json"), options)
        drop = next(g for g in record["gates"] if g["name"] == "max_similarity_drop")
        assert drop["note"].startswith(against) and (drop["value"] is None) == (metric == "dot")

    # a re-run of week-1 after the later runs keeps its place: nothing before it to compare with
    assert main(["audit", "--config", str(path)]) == 0
    rerun = read_json(join_uri(config.output, "runs", "week-1", "run.json"), options)
    assert rerun["attempt"] != first["attempt"] and rerun["timings"]["first_started"] == first["timings"]["started"]
    assert next(g for g in rerun["gates"] if g["name"] == "max_similarity_drop")["note"].startswith("no earlier")


def test_gates_need_their_columns_before_any_work() -> None:
    check_manifest_supports(Gates(max_residual_share=0.5), ["pair_id", "query_uri", "reference_uri"])
    with pytest.raises(UserError, match="gates.max_false_match_rate: the manifest has no 'label' column"):
        check_manifest_supports(Gates(max_false_match_rate=0.1), ["pair_id", "query_uri", "reference_uri"])
    with pytest.raises(UserError, match="query_bbox"):
        check_manifest_supports(Gates(min_same_label_pointing=0.8), ["pair_id", "label"])
