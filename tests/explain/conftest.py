"""Fixtures of the explainer tests."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed, so a failure can be replayed)."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    torch.manual_seed(value)
    return value
