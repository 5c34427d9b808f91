"""The audit job's stages, each a callable on a pyarrow Table of manifest rows, in a module of its own.

Ray Data runs them (job.py), but none imports Ray, so each can be tested on its own:

    FetchImages   CPU task     URIs -> decoded, resized uint8 pixels (or JPEG bytes), or a per-row error  fetch.py
    ExplainPairs  actor        [JPEG bytes -> pixels (DecodeJpegs),] pixels -> similarity, CIS, maps      explain.py
    RenderResults CPU task     maps -> PNG overlays; drops the transient pixel columns                    render.py
    StageChain    actor        several of them one after another in one process                           here

Pixels travel between stages as raw uint8 bytes in binary columns (columns.py); Ray Data's write
tasks name the result files with PartFiles (part_files.py). A Ray worker process imports the
module of each stage it runs: one that fetches never imports torchvision, one that renders or
writes never imports torch (seconds of CPU per process at a cluster's start).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa


class StageChain:
    """Stages built and run one after another in one process, e.g. in each actor of a CPU-only
    cluster: a batch's pixels then never leave the process that decoded them."""

    def __init__(self, stages: Sequence[tuple[type, dict[str, Any]]]) -> None:
        self.stages = [stage(**kwargs) for stage, kwargs in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch
