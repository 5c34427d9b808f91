"""Faults and hostile input during a run: the job finishes or fails cleanly, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.distributed.job import _pipeline_error, run_audit
from pipeline.errors import Terminated, UserError, as_sent
from pipeline.io.iceberg_store import TableConfig
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageError, StorageOptions, StorageUnavailable, exists, join_uri, read_bytes
from pipeline.layout import RunLayout
from pipeline.reporting import write_report
from pipeline.stopping import stop_signals

from audit_data import job_config, write_audit, write_weights

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]

HOSTILE_IDS = ["../../escape", "a/b", "nul\x00id", "x" * 300, "Ünïcödé 画像 🙂", "<script>alert(1)</script>"]


# small batches, so that a fault lands mid-run; hostile rows may fail without failing the run
HARDENING = {"batch_size": 4, "max_error_fraction": 0.5, "render_png": "all"}


def explain_actor_pids() -> set[int]:
    """The explaining actors' processes: on this CPU-only Ray they run the StageChain of fetch, explain, render."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any("StageChain" in part for part in process.info["cmdline"] or []):
            found.add(process.info["pid"])
    return found


def test_explain_actor_killed_mid_run(local_ray, tmp_path, rng) -> None:
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=16, top_k=6)
    config = job_config(root, options, manifest, "killed", **HARDENING)
    seen: set[int] = set()
    killed: list[tuple[int, float]] = []
    run_status: list[str] = []  # what the run's record said while its first attempt ran
    run_record = RunLayout(config.output, "killed", "unused", "unused").run_record

    def kill_first_actor() -> None:
        deadline = time.time() + 300  # a loaded machine starts actors slowly
        while time.time() < deadline and not killed:
            pids = explain_actor_pids() if exists(run_record, options) else set()  # once the attempt has started
            seen.update(pids)
            if pids:
                run_status.append(json.loads(read_bytes(run_record, options))["status"])
                time.sleep(1.0)  # let it take some batches first
                pid = min(pids)
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, time.time()))
            time.sleep(0.05)
        while time.time() < deadline and not (explain_actor_pids() - {killed[0][0]} if killed else set()):
            time.sleep(0.1)
        seen.update(explain_actor_pids())

    killer = threading.Thread(target=kill_first_actor, daemon=True)
    killer.start()
    summary = run_audit(config)
    finished = time.time()
    killer.join(timeout=30)
    assert killed and killed[0][1] < finished, "the actor was not killed while the job ran"
    assert len(seen) >= 2, "no replacement actor started"
    assert run_status == ["running"]  # a first attempt killed now, driver and all, leaves a run that says so
    table = HiveParquetStore(config.output, options).read(run_id="killed")
    pair_ids = table.column("pair_id").to_pylist()
    assert sorted(pair_ids) == sorted(r["pair_id"] for r in rows)  # every pair exactly once
    assert summary.ok == len(rows)


def test_hostile_pair_ids_and_credentials_stay_out(local_ray, s3_bucket, s3_secret, rng, caplog) -> None:
    caplog.set_level("INFO")
    bucket, options = s3_bucket
    root = f"s3://{bucket}/hostile"
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=3, pair_ids=HOSTILE_IDS)
    config = job_config(root, options, manifest, "hostile", **HARDENING)
    # a password in a catalog URI is refused by the config (test_iceberg); a user name stays out of the record
    given = config.model_copy(update={"table": TableConfig(catalog={"uri": "postgresql://auditor@db/c"})})
    run_audit(given)
    table = HiveParquetStore(config.output, options).read(run_id="hostile")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(HOSTILE_IDS)  # preserved as given
    layout = RunLayout(config.output, "hostile", "unused", "unused")
    png_uris = table.column("png_uri").to_pylist()
    assert len(set(png_uris)) == len(HOSTILE_IDS)
    assert all(uri.startswith(layout.png_root + "/") and ".." not in uri for uri in png_uris)

    report_uri = write_report(config.output, "hostile", options)
    report = read_bytes(report_uri, options).decode()
    record = read_bytes(layout.run_record, options).decode()
    assert "<script>alert(1)</script>" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "run_id" in record and "postgresql://***@db/c" in record and logs  # the searched texts are not empty
    for text in (report, record, logs, json.dumps(config.model_dump(mode="json"))):
        assert s3_secret not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text


def test_s3_outage_mid_run_fails_cleanly_and_rerun_completes(new_driver, rng) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="outage")
    options = StorageOptions(endpoint_url=endpoint, region="us-east-1")
    root = "s3://outage/audit"
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=16, top_k=6)
    config = job_config(root, options, manifest, "outage", **HARDENING)
    outage: list[float] = []

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def cut_the_endpoint() -> None:
        """Mid-run: once the first overlay is written, the manifest has been read and pairs remain."""
        deadline = time.time() + 120
        while time.time() < deadline and not client.list_objects_v2(Bucket="outage", Prefix="audit/audits/png/")["KeyCount"]:
            time.sleep(0.05)
        servers[0].stop()
        outage.append(time.time())
        time.sleep(45)  # longer than the storage retries
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()
        outage.append(time.time())

    cutter = threading.Thread(target=cut_the_endpoint, daemon=True)
    cutter.start()
    try:
        try:
            run_audit(config)
            completed = True
        except Exception as error:
            completed = False
            assert "unreachable" in str(error) or "Could not connect" in str(error), error
        cutter.join(timeout=120)
        print(f"outage outcome: {'completed through the outage' if completed else 'failed cleanly, re-run completed'}")
        layout = RunLayout(config.output, "outage", "unused", "unused")
        if not completed:
            assert not exists(layout.success_marker, options)
            new_driver()
            run_audit(config)  # the endpoint is back: the same run_id again, as a new job
        assert outage and len(outage) == 2
        table = HiveParquetStore(config.output, options).read(run_id="outage")
        assert sorted(table.column("pair_id").to_pylist()) == sorted(r["pair_id"] for r in rows)
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert exists(layout.success_marker, options)
    finally:
        servers[-1].stop()


def test_an_attempt_that_another_commits_under_does_not_replace_it(local_ray, tmp_path, rng, monkeypatch) -> None:
    """Two attempts of one run_id overlap (a manual re-run beside a scheduled retry): the one that
    finishes second fails and leaves the first one's committed run exactly as it was."""
    from pipeline.distributed import job

    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=3)
    config = job_config(root, options, manifest, "overlap", render_png="none")
    run_audit(config)  # the run's first attempt
    checked = job.preflight

    def preflight_then_another_attempt_commits(*args):
        plan = checked(*args)
        monkeypatch.setattr(job, "preflight", checked)
        run_audit(config)  # runs and commits while this attempt is under way
        attempts.append(plan.layout)
        return plan

    attempts: list[RunLayout] = []

    monkeypatch.setattr(job, "preflight", preflight_then_another_attempt_commits)
    layout = RunLayout(config.output, "overlap", "unused", "unused")
    with pytest.raises(UserError, match="committed while attempt"):
        run_audit(config)
    assert json.loads(read_bytes(attempts[0].attempt_record, options))["status"] == "failed"
    committed = json.loads(read_bytes(layout.success_marker, options))["attempt"]
    record = json.loads(read_bytes(layout.run_record, options))
    assert record["attempt"] == committed and record["status"] == "succeeded"
    table = HiveParquetStore(config.output, options).read(run_id="overlap")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(r["pair_id"] for r in rows)
    assert set(table.column("attempt").to_pylist()) == {committed}


def test_a_stop_in_the_clean_up_after_the_commit_keeps_the_committed_attempt(local_ray, tmp_path, rng,
                                                                          monkeypatch) -> None:
    """Ctrl-C while a re-run deletes the replaced attempt's files, after its _SUCCESS: the re-run
    is the run. Its record stays "succeeded" and its overlays stay; before, the interruption
    recorded it as failed and deleted the overlays that its committed rows link to."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, rows = write_audit(root, options, rng, queries=2, top_k=2)
    config = job_config(root, options, manifest, "stopped-late", render_png="all")
    run_audit(config)

    def interrupted(*_args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(HiveParquetStore, "_remove_other_attempts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config)
    layout = RunLayout(config.output, "stopped-late", "unused", "unused")
    committed = json.loads(read_bytes(layout.success_marker, options))["attempt"]
    assert json.loads(read_bytes(layout.run_record, options))["attempt"] == committed
    assert json.loads(read_bytes(replace(layout, attempt=committed).attempt_record, options))["status"] == "succeeded"
    table = HiveParquetStore(config.output, options).read(run_id="stopped-late")
    assert set(table.column("attempt").to_pylist()) == {committed} and table.num_rows == len(rows)
    assert all(exists(uri, options) for uri in table.column("png_uri").to_pylist())


def test_a_stop_while_the_attempt_writes_its_first_records_fails_it(tmp_path, rng, monkeypatch) -> None:
    """Ctrl-C between the attempt's first record and the run's: both end "failed", not "running"."""
    from pipeline.distributed.run_record import RunRecorder

    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=1, top_k=2)
    config = job_config(root, options, manifest, "stopped-early", render_png="none")
    record_run = RunRecorder._record_run_unless_committed
    calls = []

    def interrupted_once(recorder, record) -> None:
        calls.append(record["status"])
        if len(calls) == 1:
            raise KeyboardInterrupt
        record_run(recorder, record)

    monkeypatch.setattr(RunRecorder, "_record_run_unless_committed", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_audit(config)
    assert calls == ["running", "failed"]
    run_record = json.loads(read_bytes(RunLayout(config.output, "stopped-early", "unused", "unused").run_record, options))
    attempt_record = RunLayout(config.output, "stopped-early", run_record["run_date"], run_record["attempt"]).attempt_record
    assert run_record["status"] == "failed" and run_record["reason"] == "interrupted (Ctrl-C)"
    assert json.loads(read_bytes(attempt_record, options)) == run_record


def test_an_output_that_cannot_be_written_is_named_before_any_work(tmp_path, rng, monkeypatch) -> None:
    from pipeline.distributed import job, run_record

    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=1, top_k=2)
    config = job_config(root, options, manifest, "unwritable", render_png="none")

    def refused(*_args) -> None:
        raise StorageUnavailable(config.output, "permission denied")

    monkeypatch.setattr(run_record, "write_json", refused)  # the attempt's first record
    monkeypatch.setattr(job, "connect", lambda: pytest.fail("no work starts"))
    with pytest.raises(StorageError, match="output location is not writable: permission denied"):
        run_audit(config)


def test_an_interruption_is_never_taken_for_the_error_it_interrupted() -> None:
    """Ctrl-C during a storage retry's back-off (inside `except StorageUnavailable`) stays an
    interruption (exit 130 / 143), and a bug raised while a user error was handled stays a bug."""
    for raised in (KeyboardInterrupt(), Terminated("stopped by SIGTERM"), TypeError("a bug")):
        try:
            try:
                raise StorageUnavailable("s3://bucket/key", "endpoint unreachable")
            except StorageUnavailable:
                raise raised  # noqa: B904 - what a handler's own failure looks like
        except BaseException as error:
            assert _pipeline_error(error) is None
    wrapped = RuntimeError("a Ray task failed")
    wrapped.__cause__ = StorageUnavailable("s3://bucket/key", "endpoint unreachable")
    assert _pipeline_error(wrapped) is wrapped.__cause__
    # raised in a Ray Data worker: the cause stays behind, its traceback's text crosses (a new user's outage)
    remote = RuntimeError(
        "ray::MapWorker(MapBatches(StageChain)).submit() (pid=11496)\nTraceback (most recent call last):\n"
        "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL\n\nDuring handling of the "
        "above exception, another exception occurred:\n\n  File \"pipeline/io/storage.py\", line 302, in _storage_errors\n"
        "pipeline.io.storage.StorageUnavailable: s3://bucket/images/q.png: endpoint unreachable (EndpointConnectionError: "
        "Could not connect to the endpoint URL: \"http://127.0.0.1:5055/bucket/images/q.png\")\n\nThe above exception "
        "was the direct cause of the following exception:\n\nray.exceptions.UserCodeException: UDF failed to process a "
        "data block.")
    found = _pipeline_error(remote)
    assert isinstance(found, StorageUnavailable) and found.uri == "s3://bucket/images/q.png"
    assert found.reason.startswith("endpoint unreachable (EndpointConnectionError: Could not connect")


def test_sigterm_in_a_blocking_ray_call_stays_a_termination(local_ray: None) -> None:
    """Ray's ray.get re-raises the Terminated that SIGTERM's handler raised inside it as a plain
    KeyboardInterrupt; as_sent gives back what the signal sent (a scheduler's stop is exit 143 and
    recorded as SIGTERM, not as Ctrl-C), and a Ctrl-C stays one."""
    import ray

    @ray.remote(num_cpus=0)
    def wait() -> None:
        time.sleep(60)

    for signum, kind in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
        waiting = wait.remote()
        with stop_signals():
            threading.Timer(1.0, os.kill, (os.getpid(), signum)).start()
            with pytest.raises(KeyboardInterrupt) as raised:
                ray.get(waiting)
            sent = as_sent(raised.value)  # as the command line's handler of the stop reads it
        ray.cancel(waiting, force=True)
        assert type(raised.value) is KeyboardInterrupt  # what Ray raises for either
        assert type(sent) is kind
        assert type(as_sent(raised.value)) is KeyboardInterrupt  # after the command, nothing is left of it


WORKING = ("fetching, explaining and rendering", 3.0)  # (a line of the log, then seconds): the actors work
STARTING = ("sfam.audit: attempt ", 0.5)  # the driver is connecting to Ray (ray.init)


@pytest.mark.parametrize(("sent", "times", "when", "status", "reason"), [
    (signal.SIGINT, 1, WORKING, 130, "interrupted (Ctrl-C)"),
    (signal.SIGINT, 2, WORKING, 130, "interrupted (Ctrl-C)"),  # an impatient second Ctrl-C
    (signal.SIGTERM, 1, WORKING, 143, "Terminated: stopped by SIGTERM"),
    (signal.SIGTERM, 1, STARTING, 143, "Terminated: stopped by SIGTERM"),
])
def test_a_stop_signal_is_one_line_and_a_failed_attempt(tmp_path, rng, sent, times, when, status, reason) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler or Kubernetes stopping it) to `python -m jobs.audit`
    while it works or while it starts Ray: the attempt is recorded as failed, and the command line
    says so in one line, exit 130 or 143 (128 + the signal), without a traceback or a crash report,
    also when a second Ctrl-C follows the first while the attempt is recorded and Ray stops."""
    root, options = str(tmp_path), StorageOptions()
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, rng, queries=16, top_k=6)
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump(job_config(root, options, manifest, "interrupted", **HARDENING).model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-m", "jobs.audit", "--config", str(config)], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    seen = []
    line_seen, seconds = when
    for line in process.stderr:
        seen.append(line)
        if line_seen in line:
            break
    time.sleep(seconds)
    for _ in range(times):
        process.send_signal(sent)
        time.sleep(0.3)
    rest = process.communicate(timeout=180)[1]
    stderr = "".join(seen) + rest
    assert process.returncode == status, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("terminated: " if sent == signal.SIGTERM else "interrupted: ")
    assert not [text for text in ("Traceback", "SIGTERM received", "Exception ignored") if text in stderr], stderr[-3000:]
    records = (tmp_path / "audits" / "runs" / "interrupted" / "attempts").glob("*/run.json")
    recorded = [json.loads(r.read_text()) for r in records]
    assert [(r["status"], r["reason"]) for r in recorded] == [("failed", reason)]
    assert recorded[0]["timings"]["finished"] > recorded[0]["timings"]["started"]  # when it was stopped
