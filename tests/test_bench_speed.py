"""The speed benchmark runs end to end (a tiny CNN and a tiny ViT, a 5 x 2 job on a local Ray) and prints every row."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.bench_speed import (
    BARE,
    DRIVER_RSS,
    FORWARDS,
    GRADCAM,
    JOB,
    MATCHED_ROW,
    SFAM_ROW,
    SMOKE,
    WORKER_RSS,
    WORKERS_RSS,
    main,
    write_section,
)

pytestmark = pytest.mark.timeout(300)


def test_smoke_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--smoke"]) == 0
    printed = capsys.readouterr().out
    for row in (BARE, SFAM_ROW, MATCHED_ROW, GRADCAM, JOB, FORWARDS, DRIVER_RSS, WORKER_RSS, WORKERS_RSS):
        assert f"| {row}" in printed, row
    cnn, vit = SMOKE["archs"]
    assert f"| {SFAM_ROW} ({cnn}; `layer4`, fast path)" in printed
    assert f"| {SFAM_ROW} ({vit}; `pos_drop`, generic path)" in printed  # the tokens entering the first block
    assert f"| {GRADCAM} ({vit}; `pos_drop`)" in printed
    for arch in (cnn, vit):
        for ratio in (f"SFAM pairs/s ÷ (bare images/s ÷ 2) ({arch})", f"SFAM ÷ pytorch-grad-cam ({arch}, pairs/s)",
                      f"SFAM matched time ÷ SFAM cis time per pair ({arch})"):
            assert f"| {ratio}" in printed, ratio
    for ratio in ("whole job ÷ in-process SFAM", "job forward passes per pair"):
        assert f"| {ratio}" in printed, ratio


def test_write_section_replaces_only_the_speed_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "## Speed\n\nfirst\n")
    assert path.read_text() == "# Benchmarks\n\n## Speed\n\nfirst\n"
    path.write_text(path.read_text() + "\n## Quality\n\nkept\n")
    write_section(path, "## Speed\n\nsecond\n")
    assert path.read_text() == "# Benchmarks\n\n## Speed\n\nsecond\n\n## Quality\n\nkept\n"


def test_target_layer_names_the_layer_of_one_arch(capsys: pytest.CaptureFixture[str]) -> None:
    """--target-layer ARCH=LAYER: e.g. a ViT's last block input, to time the faster layer beside the default."""
    vit = SMOKE["archs"][1]
    assert main(["--smoke", "--skip-job", "--archs", vit, "--target-layer", f"{vit}=blocks.10"]) == 0
    printed = capsys.readouterr().out
    assert f"| {SFAM_ROW} ({vit}; `blocks.10`, generic path)" in printed and f"| {GRADCAM} ({vit}; `blocks.10`)" in printed
    with pytest.raises(SystemExit):
        main(["--smoke", "--target-layer", "blocks.10"])
