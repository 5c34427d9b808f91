"""The job benchmark and the soak run end to end on a local Ray (tiny audits) and print every row."""

from __future__ import annotations

import pytest

from jobs import bench_job, soak

pytestmark = pytest.mark.timeout(300)


def test_bench_job_smoke_prints_the_ratios_and_the_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_job.main(["--smoke", "--timed-pairs", "4"]) == 0
    printed = capsys.readouterr().out
    for row in ("whole job ÷ decode-only", "job in steady state ÷ decode-only", "whole job ÷ explain-only",
                "job in steady state ÷ explain-only",
                bench_job.DECODE, bench_job.FETCH_REST, bench_job.EXPLAIN, bench_job.RENDER, bench_job.WRITE,
                f"&nbsp;&nbsp;{bench_job.WORKERS}", f"&nbsp;&nbsp;{bench_job.DRIVER}", f"&nbsp;&nbsp;{bench_job.RAY}",
                "Ray's overhead"):
        assert f"| {row}" in printed or f"| **{row}" in printed, row


def test_soak_smoke_counts_every_pair_once_and_samples_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["--smoke"]) == 0
    printed = capsys.readouterr().out
    pairs, chunk = soak.SMOKE["pairs"], soak.SMOKE["chunk"]
    assert f"- rows: {pairs:,} result rows, {pairs:,} distinct pair ids, {pairs:,} manifest rows (exact)" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and line.split("|")[1].strip()[0].isdigit()]
    assert [int(row.split("|")[1].replace(",", "")) for row in rows] == list(range(chunk, pairs + 1, chunk))
    assert all(float(cell.replace(",", "")) > 0 for cell in rows[-1].split("|")[3:6])  # every group's USS sampled
