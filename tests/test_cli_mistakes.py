"""Every user mistake ends in one line, `error: <what>: <why>`, exit status 2, no traceback, no secret.

The commands run as a user or a scheduler runs them: `python -m pipeline.cli ...` (`sfam`) and
`python -m jobs.audit ...` subprocesses. S3 mistakes are made against moto's server (the
`s3_server` fixture of tests/conftest.py, and for wrong credentials a second moto server that
enforces authentication). Mistakes that can be found before work starts must be reported
before Ray starts, and before anything is written. Each case prints its exit status, the
time it took and its last line; the module prints them all as a table at the end.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
from pipeline.io.results_store import HiveParquetStore
from pipeline.io.storage import StorageOptions, join_uri
from pipeline.io.tables import read_json

from audit_data import job_config, picture_bytes, small_resnet, write_audit, write_weights

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
SFAM = [sys.executable, "-m", "pipeline.cli"]
JOB = [sys.executable, "-m", "jobs.audit"]
REGION = "us-east-1"
RUN_ID = "2026-11-26"
RAY_STARTED = "Started a local Ray instance"  # ray.init's log line when it starts a local Ray
FAST = 60.0  # seconds: a mistake found before work starts is reported well within this
ENDPOINT_FORGOTTEN_BOUND = 30.0  # seconds: the issue measured 44 s of retries before the message

RESULTS: list[tuple[str, int, float, str]] = []  # (case, exit status, seconds, last line of stderr)


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run(case: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 400) -> Done:
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env if env is not None else base_env(), capture_output=True,
                          text=True, timeout=timeout)
    result = Done(done.returncode, done.stdout, done.stderr, time.time() - started)
    RESULTS.append((case, result.returncode, result.seconds, result.last_line))
    print(f"\n[{case}] exit {result.returncode} in {result.seconds:.1f} s: {result.last_line}")
    return result


def assert_mistake(done: Done, *named: str, secrets: tuple[str, ...] = (), exit_code: int = 2,
                   prefix: str = "error: ", bound: float = FAST, debug: bool = False) -> None:
    """One clear last line that names the thing, the right exit status, no traceback, no secret, fast."""
    tail = done.stderr[-4000:]
    assert done.returncode == exit_code, tail
    assert done.last_line.startswith(prefix), tail
    for name in named:
        assert name in done.last_line, f"{name!r} not named in: {done.last_line}"
    if debug:
        assert "Traceback" in done.stderr, tail
    else:
        assert "Traceback" not in done.stderr, tail
    for secret in secrets:
        assert secret not in done.stdout and secret not in done.stderr, "a secret was printed"
    assert done.seconds < bound, f"took {done.seconds:.1f} s"


def assert_before_ray(done: Done) -> None:
    assert RAY_STARTED not in done.stderr and RAY_STARTED not in done.stdout, done.stderr[-4000:]


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    return sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                  for o in page.get("Contents", []))


def bucket_exists(endpoint: str, bucket: str) -> bool:
    import boto3

    names = boto3.client("s3", endpoint_url=endpoint, region_name=REGION).list_buckets()["Buckets"]
    return bucket in {b["Name"] for b in names}


def _endpoint(config: Path) -> str:
    return yaml.safe_load(config.read_text())["storage_options"]["endpoint_url"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its content (empty when there is no folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_such_bucket() -> str:
    return f"sfam-no-such-bucket-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module", autouse=True)
def results_table() -> Iterator[None]:
    yield
    print("\n\ncase | exit | seconds | last line of stderr")
    for case, code, seconds, line in RESULTS:
        print(f"{case} | {code} | {seconds:.1f} | {line}")


@pytest.fixture(scope="module")
def local_audit(tmp_path_factory, s3_server: str) -> Path:
    """A tiny audit on local files: its config file (the fake S3 secret is in the env meanwhile)."""
    root = tmp_path_factory.mktemp("local-audit")
    options = StorageOptions()
    write_weights(join_uri(str(root), "models", "model.pt"), options)
    manifest, _ = write_audit(str(root), options, np.random.default_rng(7), queries=2, top_k=2)
    return write_config(root / "audit.yaml", job_config(str(root), options, manifest, "local-run",
                                                        max_error_fraction=0.0))


@pytest.fixture(scope="module")
def s3_audit(s3_server: str, tmp_path_factory) -> tuple[str, str, Path]:
    """A tiny audit in a new bucket of the moto server: (bucket, its root URI, the config file)."""
    import boto3

    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=REGION).create_bucket(Bucket=bucket)
    root, options = f"s3://{bucket}/audit", StorageOptions(endpoint_url=s3_server, region=REGION)
    write_weights(join_uri(root, "models", "model.pt"), options)
    manifest, _ = write_audit(root, options, np.random.default_rng(11), queries=2, top_k=2)
    config = write_config(tmp_path_factory.mktemp("s3-audit") / "audit.yaml",
                          job_config(root, options, manifest, "s3-run"))
    return bucket, root, config


@pytest.fixture(scope="module")
def finished_local_run(local_audit: Path) -> tuple[Done, Path]:
    """Case 9, run once: the tiny local audit to completion with `--set run_id=2026-11-26`."""
    done = run("9 --set run_id=2026-11-26 (full job)",
               [*JOB, "--config", str(local_audit), "--set", f"run_id={RUN_ID}"], timeout=500)
    return done, local_audit.parent / "audits"


# 1-5: storage and credentials, against moto


def test_manifest_in_a_bucket_that_does_not_exist(s3_audit, s3_secret) -> None:
    bucket, root, config = s3_audit
    missing = no_such_bucket()
    before = s3_keys(_endpoint(config), bucket)
    done = run("1 manifest bucket missing", [*JOB, "--config", str(config), "--set", f"manifest=s3://{missing}/pairs.parquet"])
    assert_mistake(done, missing, secrets=(s3_secret,))
    assert_before_ray(done)
    assert s3_keys(_endpoint(config), bucket) == before


def test_manifest_key_missing_in_an_existing_bucket(s3_audit, s3_secret) -> None:
    bucket, root, config = s3_audit
    before = s3_keys(_endpoint(config), bucket)
    done = run("2 manifest key missing", [*SFAM, "audit", "--config", str(config), "--set",
                                           f"manifest={root}/nowhere/pairs.parquet"])
    assert_mistake(done, f"{bucket}/audit/nowhere/pairs.parquet", secrets=(s3_secret,))
    assert_before_ray(done)
    assert s3_keys(_endpoint(config), bucket) == before


def test_output_in_a_bucket_that_does_not_exist(s3_audit, s3_secret) -> None:
    bucket, root, config = s3_audit
    endpoint = _endpoint(config)
    missing = no_such_bucket()
    before = s3_keys(endpoint, bucket)
    done = run("3 output bucket missing", [*JOB, "--config", str(config), "--set", f"output=s3://{missing}/audits"])
    assert_mistake(done, missing, secrets=(s3_secret,))
    assert_before_ray(done)
    assert s3_keys(endpoint, bucket) == before  # nothing written next to the inputs
    assert not bucket_exists(endpoint, missing)  # nor a bucket created


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strict_s3_server() -> Iterator[str]:
    """A second moto server that enforces authentication (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the strict moto server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_wrong_credentials(strict_s3_server: str, local_audit: Path, tmp_path: Path, s3_secret) -> None:
    bogus_key, bogus_secret = "AKIABOGUS0000EXAMPLE", f"bogus-secret-{uuid.uuid4().hex}"
    config = yaml.safe_load(local_audit.read_text())
    config.update(manifest="s3://audits/pairs.parquet", output="s3://audits/out",
                  storage_options={"endpoint_url": strict_s3_server, "region": REGION})
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    env = base_env(AWS_ACCESS_KEY_ID=bogus_key, AWS_SECRET_ACCESS_KEY=bogus_secret, AWS_DEFAULT_REGION=REGION)
    done = run("4 wrong credentials", [*JOB, "--config", str(path)], env=env)
    assert_mistake(done, "s3://audits/pairs.parquet", secrets=(bogus_secret, s3_secret))
    assert any(word in done.last_line.lower() for word in ("denied", "forbidden", "credential", "access key"))
    assert_before_ray(done)


def test_no_credentials(s3_audit, tmp_path: Path, s3_secret) -> None:
    bucket, root, config = s3_audit
    env = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "no-such-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-such-credentials"))
    done = run("5 no credentials", [*JOB, "--config", str(config)], env=env)
    assert_mistake(done, f"{root}/pairs.parquet", "credentials", secrets=(s3_secret,))
    assert_before_ray(done)


def test_relative_manifest_that_is_not_there(local_audit: Path, s3_secret) -> None:
    """A relative manifest path is read from the current directory: the message names where it led."""
    before = snapshot(local_audit.parent)
    done = run("manifest relative, missing", [*JOB, "--config", str(local_audit), "--set", "manifest=no/pairs.parquet"])
    assert_mistake(done, f"manifest {ROOT / 'no' / 'pairs.parquet'}: not found", secrets=(s3_secret,))
    assert_before_ray(done)
    assert snapshot(local_audit.parent) == before


def test_manifest_whose_images_are_relative_to_another_folder(local_audit: Path, tmp_path: Path, s3_secret) -> None:
    """Relative image URIs are read from the manifest's folder: a manifest moved away from its images
    failed every row after the whole run (exit 1); it is now one line before Ray starts."""
    config = yaml.safe_load(local_audit.read_text())
    moved = tmp_path / "elsewhere" / "pairs.parquet"
    moved.parent.mkdir()
    moved.write_bytes(Path(config["manifest"]).read_bytes())
    before = snapshot(local_audit.parent)
    done = run("manifest away from its images", [*JOB, "--config", str(local_audit), "--set", f"manifest={moved}"])
    assert_mistake(done, "distinct images of the manifest's first rows exists", f"looked for at {tmp_path / 'elsewhere'}",
                   "relative URIs are read from the manifest's folder", secrets=(s3_secret,))
    assert_before_ray(done)
    assert snapshot(local_audit.parent) == before


# 6-8: the model


def test_wrong_target_layer(local_audit: Path, s3_secret) -> None:
    before = snapshot(local_audit.parent)
    done = run("6 target_layer=layer5", [*JOB, "--config", str(local_audit), "--set", "model.target_layer=layer5"])
    assert_mistake(done, "layer5", "layer4", secrets=(s3_secret,))
    assert_before_ray(done)
    assert snapshot(local_audit.parent) == before  # nothing written


def test_ray_address_where_no_ray_answers(local_audit: Path, s3_secret) -> None:
    """RAY_ADDRESS naming a head that is not there: one line at once, and the attempt is recorded as failed."""
    address = f"127.0.0.1:{_free_port()}"
    done = run("RAY_ADDRESS with no Ray there", [*JOB, "--config", str(local_audit), "--set", "run_id=no-ray"],
               env=base_env(RAY_ADDRESS=address))
    assert_mistake(done, address, "RAY_ADDRESS", secrets=(s3_secret,))
    attempts = (local_audit.parent / "audits" / "runs" / "no-ray" / "attempts").glob("*/run.json")
    assert [yaml.safe_load(record.read_text())["status"] for record in attempts] == ["failed"]


def test_wrong_target_layer_with_debug_shows_the_traceback(local_audit: Path, s3_secret) -> None:
    done = run("12 --debug target_layer=layer5",
               [*SFAM, "audit", "--debug", "--config", str(local_audit), "--set", "model.target_layer=layer5"])
    assert_mistake(done, "layer5", secrets=(s3_secret,), debug=True)
    assert_before_ray(done)


def test_debug_traceback_redacts_credentials_as_the_line_does(local_audit: Path, s3_secret) -> None:
    """--debug printed the traceback as raised: a manifest URL's user:password appeared in it."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        manifest = f"http://auditor:PASSWORD@127.0.0.1:{probe.getsockname()[1]}/pairs.parquet"
    done = run("12b --debug manifest with credentials",
               [*SFAM, "audit", "--debug", "--config", str(local_audit), "--set", f"manifest={manifest}"])
    assert_mistake(done, "http://***@127.0.0.1", secrets=(s3_secret, "PASSWORD"), debug=True)


def test_pickled_whole_model_checkpoint(local_audit: Path, tmp_path: Path, s3_secret) -> None:
    weights = tmp_path / "whole-model.pt"
    torch.save(small_resnet(), weights)  # the whole nn.Module, pickled: loading it runs code
    before = snapshot(local_audit.parent)
    done = run("7 pickled whole model", [*JOB, "--config", str(local_audit), "--set", f"model.weights={weights}"])
    assert_mistake(done, "whole-model.pt", "trust_checkpoint", secrets=(s3_secret,))
    assert_before_ray(done)
    assert snapshot(local_audit.parent) == before


def test_checkpoint_of_another_model(local_audit: Path, tmp_path: Path, s3_secret) -> None:
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, 32)  # the config's model has embedding_dim 16
    weights = tmp_path / "other-model.pt"
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    weights.write_bytes(buffer.getvalue())
    before = snapshot(local_audit.parent)
    done = run("8 mismatched checkpoint", [*JOB, "--config", str(local_audit), "--set", f"model.weights={weights}"])
    assert_mistake(done, "other-model.pt", "fc.weight", secrets=(s3_secret,))
    assert_before_ray(done)
    assert snapshot(local_audit.parent) == before


# 9-10: a date-like run_id, and the report


def test_date_like_run_id_is_accepted(finished_local_run, s3_secret) -> None:
    done, output = finished_local_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"run {RUN_ID}:" in done.stdout
    assert RAY_STARTED in done.stderr + done.stdout  # the marker the other cases look for is real
    for secret in (s3_secret,):
        assert secret not in done.stdout and secret not in done.stderr
    record = read_json(str(output / "runs" / RUN_ID / "run.json"), StorageOptions())
    assert record["run_id"] == RUN_ID and record["status"] == "succeeded"
    assert record["config"]["run_id"] == RUN_ID
    assert list((output / "results").glob(f"*/run_id={RUN_ID}"))
    table = HiveParquetStore(str(output), StorageOptions()).read(run_id=RUN_ID)
    assert table.num_rows == 4 and set(table.column("run_id").to_pylist()) == {RUN_ID}  # the string, not a date
    assert not any(s3_secret.encode() in content for content in snapshot(output).values())


def test_report_with_the_endpoint_forgotten(s3_audit, s3_secret) -> None:
    bucket, root, config = s3_audit
    done = run("10 report, endpoint forgotten", [*SFAM, "report", f"{root}/audits", "--run-id", RUN_ID], timeout=200)
    assert_mistake(done, f"s3://{bucket}/audit/audits", "endpoint", secrets=(s3_secret,), bound=ENDPOINT_FORGOTTEN_BOUND)


def test_report_with_config_reaches_the_endpoint(finished_local_run, s3_audit, tmp_path: Path, s3_secret) -> None:
    """The finished run, copied to the moto bucket; `sfam report --config` finds it there."""
    import boto3

    done, output = finished_local_run
    assert done.returncode == 0, done.stderr[-4000:]
    bucket, root, config = s3_audit
    endpoint = _endpoint(config)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    for path in output.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"audit/copied/{path.relative_to(output)}")
    data = yaml.safe_load(config.read_text())
    data["output"] = f"{root}/copied"
    s3_config = tmp_path / "copied.yaml"
    s3_config.write_text(yaml.safe_dump(data))
    report = run("10 report --config (moto)", [*SFAM, "report", "--config", str(s3_config), "--run-id", RUN_ID])
    assert report.returncode == 0, report.stderr[-4000:]
    assert f"s3://{bucket}/audit/copied/reports/{RUN_ID}.html" in report.stdout
    assert f"audit/copied/reports/{RUN_ID}.html" in s3_keys(endpoint, bucket)
    assert s3_secret not in report.stdout and s3_secret not in report.stderr

    nightly = yaml.safe_load((output.parent / "audit.yaml").read_text())  # a nightly config: the manifest is --set
    del nightly["manifest"]
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(nightly))
    local = run("10 report --config (local)", [*SFAM, "report", "--config", str(tmp_path / "nightly.yaml"),
                                               "--run-id", RUN_ID, "-o", str(tmp_path / "local.html")])
    assert local.returncode == 0, local.stderr[-4000:]
    assert "<html" in (tmp_path / "local.html").read_text().lower()


# 11: sfam explain


def test_explain_with_a_corrupt_image(tmp_path: Path, s3_secret) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(picture_bytes(np.random.default_rng(3), 64, 64))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg body")
    out = tmp_path / "pair.png"
    done = run("11 explain corrupt image", [*SFAM, "explain", str(corrupt), str(good), "--model",
                                            "{arch: resnet18, embedding_dim: 16, input_size: 64}", "-o", str(out)])
    assert_mistake(done, "corrupt.jpg", secrets=(s3_secret,))
    assert not out.exists()


def test_explain_a_vit_at_a_size_it_was_not_built_for(tmp_path: Path, s3_secret) -> None:
    """torchvision's ViTs run at 224 px only: the model's own check becomes one line naming input_size."""
    pictures = []
    for seed in (4, 5):
        pictures.append(tmp_path / f"{seed}.png")
        pictures[-1].write_bytes(picture_bytes(np.random.default_rng(seed), 64, 64))
    out = tmp_path / "pair.png"
    done = run("11 explain vit_b_16 at 64 px", [*SFAM, "explain", *map(str, pictures), "--model",
                                                "{arch: vit_b_16, input_size: 64}", "-o", str(out)])
    assert_mistake(done, "vit_b_16", "model.input_size", "224", secrets=(s3_secret,))
    assert not out.exists()


def test_explain_with_an_arch_that_does_not_exist(tmp_path: Path, s3_secret) -> None:
    """Only the error: the warning that a model without weights explains its random initialisation
    comes once the model is known to build."""
    picture = tmp_path / "a.png"
    picture.write_bytes(picture_bytes(np.random.default_rng(6), 64, 64))
    done = run("11 explain unknown arch", [*SFAM, "explain", str(picture), str(picture), "--model",
                                           "{arch: timm/efficientnet_b00, input_size: 64}", "-o", str(tmp_path / "p.png")])
    assert_mistake(done, "efficientnet_b00", secrets=(s3_secret,))
    assert done.stderr.strip().count("\n") == 0, done.stderr
