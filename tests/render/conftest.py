"""A headless Chromium for the report's browser test, installed with apt when missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=1200, check=False)


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Path of Chromium; runs `apt-get install -y chromium` first when it is absent."""
    if not CHROMIUM.exists():
        result = _apt("install", "-y", "chromium")
        if result.returncode != 0:  # stale or empty package lists: refresh once, then retry
            _apt("update")
            result = _apt("install", "-y", "chromium")
        if result.returncode != 0 or not CHROMIUM.exists():
            pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {result.stderr[-500:]}")
    return str(CHROMIUM)
