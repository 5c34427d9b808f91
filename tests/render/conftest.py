"""A headless Chromium for the report's browser tests: `make browser` installs it (make test runs that first)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Path of Chromium, or a skip that says how to install it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Chromium is not installed: run `make browser` (Debian/Ubuntu, as root) for the browser tests")
    return binary
