"""Connecting the driver to Ray: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from pipeline.errors import UserError

PROBE_SECONDS = 5.0  # how long RAY_ADDRESS's head may take to accept a connection


class ClusterUnavailable(UserError):
    """The Ray cluster that RAY_ADDRESS or this machine's last `ray start` names cannot be reached."""


def connect() -> None:
    """Joins the cluster of `ray job submit` (or RAY_ADDRESS, or one started with `ray start` on this
    machine), else starts a local Ray; once per process. A cluster that cannot be reached is one
    ClusterUnavailable, at once where RAY_ADDRESS names a head that refuses connections."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    _probe(address)
    try:
        _init(log_to_driver=True)
    except ConnectionError as error:
        raise ClusterUnavailable(_advice(address or "this machine's default address", error)) from error


def _probe(address: str) -> None:
    """Raises ClusterUnavailable when RAY_ADDRESS is host:port and nothing accepts a connection there."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or "/" in host or not port.isdigit():
        return  # unset, "auto", "local" or an http:// address: Ray decides
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address is written [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        raise ClusterUnavailable(_advice(address, error)) from error


def _advice(address: str, error: BaseException) -> str:
    return (f"cannot reach the Ray cluster at {address} ({error}): unset RAY_ADDRESS to run on a local Ray, "
            "or run `ray stop` if a Ray started on this machine has died")


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray, not a cluster): no
    autoscaler adds nodes to it, so resources it lacks never come."""
    node = getattr(ray._private.worker, "_global_node", None)  # Ray's own record of the node this driver runs
    return bool(ray.is_initialized() and getattr(node, "head", False))


@contextmanager
def local_cluster() -> Iterator[None]:
    """A new local Ray without its dashboard for the length of the block (the demo's); never the
    cluster that RAY_ADDRESS or an earlier `ray start` on this machine names, which may have died."""
    _init(address="local", ignore_reinit_error=True, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _init(**options: Any) -> None:
    """ray.init, keeping this process's SIGTERM handling: Ray's driver replaces it with a crash
    report and an abort (exit 134), so a scheduler stopping the job would read as a crash."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        ray.init(**options)
    except SystemExit as stop:  # SIGTERM while ray.init ran, by Ray's handler: handled as the process would
        if stop.code == signal.SIGTERM and callable(handler):
            handler(signal.SIGTERM, None)
        raise
    finally:
        # ignored: a stop handled while ray.init ran ignores the next ones until its clean-up is done
        if in_main_thread and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)
