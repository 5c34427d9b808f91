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


def test_the_probe_reaches_an_ipv6_address_in_brackets() -> None:
    """RAY_ADDRESS=[::1]:PORT is how Ray writes an IPv6 head; the probe connects to ::1, not to "[::1]"."""
    from pipeline.distributed.cluster import ClusterUnavailable, _probe

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
        try:
            server.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        server.listen()
        port = server.getsockname()[1]
        _probe(f"[::1]:{port}")  # listening: no error
    with pytest.raises(ClusterUnavailable, match=r"\[::1\]"):
        _probe(f"[::1]:{port}")  # closed now


def test_a_sigterm_while_ray_starts_is_this_processs_stop(monkeypatch) -> None:
    """ray.init installs a SIGTERM handler of its own (sys.exit(15)) while it starts Ray: a SIGTERM
    then is raised as the command's stop, and the stop signals stay ignored for its clean-up."""
    import signal
    import time

    import ray

    from pipeline.distributed.cluster import _init
    from pipeline.errors import Terminated
    from pipeline.stopping import stop_signals

    def like_ray_init(**options: object) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives here

    monkeypatch.setattr(ray, "init", like_ray_init)
    with stop_signals():
        with pytest.raises(Terminated):
            _init(address="local")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # not _stop again: a second SIGTERM waits
