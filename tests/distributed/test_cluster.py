"""The demo's local Ray: always a new one, whatever RAY_ADDRESS or an earlier `ray start` names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_local_cluster_ignores_a_dead_ray_address() -> None:
    """A Ray that died leaves its address behind (RAY_ADDRESS, /tmp/ray): the demo must not try to join it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once the socket closes
    code = ("import ray\nfrom pipeline.distributed.cluster import local_cluster\n"
            "with local_cluster():\n    print(ray.get(ray.put(41)) + 1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "42"
