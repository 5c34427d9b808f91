"""The CPU-stage benchmark prints every row."""

from __future__ import annotations

import pytest

from jobs.bench_stages import DRAFT_DECODE, FULL_DECODE, HEADER_CHECK, main


def test_smoke_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--smoke"]) == 0
    printed = capsys.readouterr().out
    for row in (FULL_DECODE, DRAFT_DECODE, HEADER_CHECK, "render_pair_png, whole overlay (now)", "encode: encode_png"):
        assert f"| {row}" in printed, row
