"""Connecting the driver to Ray: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray


def connect() -> None:
    """Joins the cluster of `ray job submit` (or RAY_ADDRESS), else starts a local Ray; once per process."""
    if not ray.is_initialized():
        ray.init(log_to_driver=True)


@contextmanager
def local_cluster() -> Iterator[None]:
    """A local Ray without its dashboard for the length of the block (the demo's)."""
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
