"""`sfam demo` / `make demo`: the whole product on the built-in demo, on a local Ray.

Builds the demo audit (cluttered digits retrieved by the shipped demo model), runs the
audit job over local folders, queries the result table with DuckDB and writes the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import yaml

from pipeline.config import ConfigError, JobConfig
from pipeline.demo.audit import DEMO_SEED, GALLERY_SIZE, MODEL_SPEC, build_demo_audit
from pipeline.distributed.cluster import local_cluster
from pipeline.distributed.job import run_audit
from pipeline.io.storage import StorageOptions
from pipeline.reporting import write_report

RUN_ID = "demo"
SETTINGS_FILE = "demo.json"  # in data/: the settings the demo wrote it with
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


def run_demo(output: str, queries: int, top_k: int) -> None:
    """Builds the demo audit under `output` (write_demo_audit), runs it (audits/), and prints what a
    user reads of it: the run's summary, the per-label figures that DuckDB gives, the report."""
    started = time.time()
    config, config_path = write_demo_audit(output, queries, top_k)
    with local_cluster():
        summary = run_audit(config)  # AuditFailed reaches the command line: exit 1
    print("\n".join(summary.lines()))
    print("\nDuckDB over the result table:")
    audits = Path(config.output)
    print(duckdb.sql(LABEL_QUERY.format(results=audits / "results", runs=audits / "runs", run_id=RUN_ID)))
    report = write_report(config.output, RUN_ID, StorageOptions())
    print(f"report: {report}")
    print(f"config: {config_path}")
    print(f"demo finished in {time.time() - started:.0f} s")


def write_demo_audit(output: str, queries: int, top_k: int) -> tuple[JobConfig, Path]:
    """Writes the demo's data (data/: images, pairs.parquet) and its job config (audit.yaml) under
    `output`; returns the config and where it is. Refused, before anything is written, where that
    would replace what the demo did not write there: data of other settings, which other runs under
    audits/ may have read, or an audit.yaml that is not the demo's."""
    root = Path(output).resolve()
    settings = {"queries": queries, "top_k": top_k, "gallery": GALLERY_SIZE, "seed": DEMO_SEED}
    config = JobConfig.model_validate({
        "manifest": str(root / "data" / "pairs.parquet"), "output": str(root / "audits"), "run_id": RUN_ID,
        "model": MODEL_SPEC, "batch_size": 5 * top_k, "num_actors": 1, "max_error_fraction": 0.0,
        "render_png": "all",  # a small audit: every pair gets its overlay in the report
    })
    config_path = root / "audit.yaml"  # the same audit again: sfam audit --config demo-output/audit.yaml
    config_text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output {output}: is a file; name a folder for the demo's data and audit")
    _check_replaces_only_the_demo(output, root, settings, config_path, config_text)
    try:
        manifest = build_demo_audit(root / "data", queries, top_k)
        (root / "data" / SETTINGS_FILE).write_text(json.dumps(settings))
        config_path.write_text(config_text)
    except OSError as error:  # a read-only or full disk, a file where the demo writes a folder
        raise ConfigError(f"--output {output}: cannot write {error.filename or root}: {error.strerror}") from error
    print(f"demo audit: {queries} queries x top-{top_k} -> {manifest}")
    return config, config_path


def _check_replaces_only_the_demo(output: str, root: Path, settings: dict, config_path: Path, config_text: str) -> None:
    """Refuses an output whose data/ the demo did not write with `settings`, or whose audit.yaml is not
    the demo's config (edited, or another audit's), rather than overwrite them."""
    data = root / "data"
    if data.is_dir() and any(data.iterdir()):
        written = _written_settings(data / SETTINGS_FILE)
        if written != settings:
            held = (f"files without the demo's {SETTINGS_FILE} (of your own, or a demo of an earlier version)"
                    if written is None else f"a demo of {written.get('queries')} queries x top-{written.get('top_k')}")
            raise ConfigError(f"--output {output}: {data} holds {held}, which runs under {root / 'audits'} may "
                              "have read; the demo would replace them: choose another --output"
                              + ("" if written is None else ", or the same --queries and --top-k"))
    if config_path.exists() and (not config_path.is_file() or config_path.read_text(errors="replace") != config_text):
        raise ConfigError(f"--output {output}: {config_path} is not the demo's config (edited, or another audit's) "
                          "and the demo would overwrite it: move it, or choose another --output")


def _written_settings(marker: Path) -> dict | None:
    """The settings a demo recorded in `marker`, or None where there are none."""
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return written if isinstance(written, dict) else None
