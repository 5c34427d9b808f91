"""End to end like a user: `ray start --head`, `ray job submit`, then DuckDB over the S3 results."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import s3fs
import yaml

from pipeline.io.storage import join_uri

from audit_data import expected_similarities, model_config, write_audit, write_weights

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


AGENT_WAIT_SECONDS = 240  # for a new head's job agent, on a loaded machine


@pytest.mark.timeout(600)
def test_ray_job_submit_over_s3_then_duckdb(s3_bucket, rng, tmp_path) -> None:
    bucket, options = s3_bucket
    root = f"s3://{bucket}/audit"
    model = write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=4, top_k=5)
    config = {
        "manifest": manifest, "output": f"{root}/audits", "run_id": "submitted-1",
        "model": model_config(join_uri(root, "models", "model.pt")), "batch_size": 10, "num_actors": 1,
        "storage_options": {"endpoint_url": options.endpoint_url, "region": options.region},
    }
    config_path = tmp_path / "audit.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # whatever this Ray's default, the cluster and the client agree on a token of this test's own
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = free_port()
    started = ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                  "--disable-usage-stats", env=env, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        while True:  # a new head's job agent may not be up yet: Ray says to try again later
            submitted = ray("job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
                            "python", "-m", "jobs.audit", "--config", str(config_path), env=env, timeout=480)
            log = submitted.stdout + submitted.stderr
            if "No available agent to submit job" not in log or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert submitted.returncode == 0, log[-5000:]
        assert "run submitted-1: 20 pairs, 20 ok, 0 error" in log
    finally:
        ray("stop", "--force", env=env, timeout=120)

    connection = duckdb.connect()
    connection.register_filesystem(s3fs.S3FileSystem(client_kwargs={"endpoint_url": options.endpoint_url}))
    table = f"read_parquet('{root}/audits/results/*/*/*.parquet', hive_partitioning = true)"
    counts = dict(connection.sql(f"SELECT status, count(*) FROM {table} WHERE run_id = 'submitted-1' GROUP BY status").fetchall())
    assert counts == {"ok": 20}
    by_label = dict(connection.sql(f"SELECT label, avg(similarity) FROM {table} GROUP BY label").fetchall())
    expected = expected_similarities(model, rows, root, options)
    for label in {r["label"] for r in rows}:
        mean = sum(expected[r["pair_id"]] for r in rows if r["label"] == label) / sum(r["label"] == label for r in rows)
        assert abs(by_label[label] - mean) < 1e-4
