"""The CPU-stage benchmark prints every row; its GPU decoding makes decode_pictures' pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.bench_stages import DRAFT_DECODE, FULL_DECODE, MAX_PIXELS, main, nvjpeg_pictures, photo_jpeg
from pipeline.io.images import decode_pictures
from pipeline.render.result_row import DISPLAY_SIDE


def test_smoke_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--smoke"]) == 0
    printed = capsys.readouterr().out
    for row in (FULL_DECODE, DRAFT_DECODE, "render_pair_png, whole overlay (now)", "encode: encode_png"):
        assert f"| {row}" in printed, row


@pytest.mark.parametrize("size", [(640, 480), (300, 500)])
def test_nvjpeg_pictures_match_decode_pictures(size: tuple[int, int]) -> None:
    """The GPU row decodes what the job decodes: the same two pictures within a grey level on average
    (torchvision's decoder here on the CPU; the benchmark runs it on CUDA)."""
    rng = np.random.default_rng(7)
    datas = [photo_jpeg(rng, *size) for _ in range(2)]
    decoded = nvjpeg_pictures([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas], 224,
                              torch.device("cpu"))
    for data, (model_input, display) in zip(datas, decoded):
        expected = decode_pictures(data, "bench.jpg", MAX_PIXELS, 224, DISPLAY_SIDE)
        for got, want in ((model_input, expected.model_input), (display, expected.display)):
            got = got.permute(1, 2, 0).numpy()  # (h, w, 3) as decode_pictures makes it
            assert got.shape == want.shape
            assert np.abs(got.astype(float) - want).mean() < 1.5
