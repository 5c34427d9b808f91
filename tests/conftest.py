"""Shared fixtures: fresh randomness and a local S3 (moto) for storage tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.io.storage import StorageOptions

S3_REGION = "us-east-1"
# fake credentials that are easy to search for in outputs that must not contain them
S3_ACCESS_KEY_ID = f"AKIASFAMTEST{uuid.uuid4().hex[:8].upper()}"
S3_SECRET = f"sfam-test-secret-{uuid.uuid4().hex}"


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator with a fresh seed per test; the seed is printed so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on a free local port, with fake credentials in the env."""
    from moto.server import ThreadedMotoServer  # test-only dependencies load where they are used

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
        env.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        env.setenv("AWS_DEFAULT_REGION", S3_REGION)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_secret(s3_server: str) -> str:
    """The fake secret access key in the environment while the S3 server runs."""
    return S3_SECRET


@pytest.fixture
def s3_bucket(s3_server: str) -> tuple[str, StorageOptions]:
    """A new, empty bucket and the StorageOptions that reach it."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=S3_REGION).create_bucket(Bucket=name)
    return name, StorageOptions(endpoint_url=s3_server, region=S3_REGION)
