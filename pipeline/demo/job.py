"""`sfam demo` / `make demo`: the whole product on the built-in demo, on a local Ray.

Builds the demo audit (cluttered digits retrieved by the shipped demo model), runs the
audit job over local folders, queries the result table with DuckDB and writes the report.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import yaml

from pipeline.config import JobConfig
from pipeline.demo.audit import MODEL_SPEC, build_demo_audit
from pipeline.distributed.cluster import local_cluster
from pipeline.distributed.job import run_audit
from pipeline.io.storage import StorageOptions
from pipeline.reporting import write_report

RUN_ID = "demo"
LABEL_QUERY = """
WITH done AS (SELECT run_id, attempt FROM read_json('{runs}/*/_SUCCESS', format = 'auto'))
SELECT CASE label WHEN 1 THEN 'same digit' ELSE 'different digit' END AS label,
       count(*) AS pairs,
       round(avg(similarity), 3) AS mean_similarity,
       round(avg(query_energy_in_box), 3) AS query_energy_in_box,
       round(avg(reference_energy_in_box), 3) AS reference_energy_in_box,
       round(avg(query_pointing_hit::INT), 3) AS query_pointing_hit
FROM read_parquet('{results}/*/*/*.parquet', hive_partitioning = true, union_by_name = true)
JOIN done USING (run_id, attempt)
WHERE run_id = '{run_id}' AND status = 'ok'
GROUP BY label ORDER BY label
"""


def run_demo(output: str, queries: int, top_k: int) -> int:
    started = time.time()
    root = Path(output).resolve()
    manifest = build_demo_audit(root / "data", queries, top_k)
    print(f"demo audit: {queries} queries x top-{top_k} -> {manifest}")
    config = JobConfig.model_validate({
        "manifest": str(manifest), "output": str(root / "audits"), "run_id": RUN_ID, "model": MODEL_SPEC,
        "batch_size": 5 * top_k, "num_actors": 1, "max_error_fraction": 0.0,
        "render_png": "all",  # a small audit: every pair gets its overlay in the report
    })
    config_path = root / "audit.yaml"  # the same audit again: sfam audit --config demo-output/audit.yaml
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    with local_cluster():
        summary = run_audit(config)  # AuditFailed reaches the command line: exit 1
    print("\n".join(summary.lines()))
    print("\nDuckDB over the result table:")
    print(duckdb.sql(LABEL_QUERY.format(results=root / "audits" / "results", runs=root / "audits" / "runs", run_id=RUN_ID)))
    report = write_report(config.output, RUN_ID, StorageOptions())
    print(f"report: {report}")
    print(f"config: {config_path}")
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0
