"""A local Ray shared by the tests of a module (started after the S3 credentials are in the env)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

LOCAL_RAY = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False}


@pytest.fixture(scope="module")
def local_ray(s3_server: str) -> Iterator[None]:
    import ray

    ray.init(**LOCAL_RAY)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def new_driver(local_ray: None) -> Callable[[], None]:
    """Restarts the local Ray, as a re-submitted job gets a new driver.

    Within one driver, the actors of a failed run can hold their CPUs for minutes after
    the failure (Ray Data drops its handles but does not kill them), which would stall a
    re-run in the same process.
    """
    import ray

    def restart() -> None:
        ray.shutdown()
        ray.init(**LOCAL_RAY)

    return restart
