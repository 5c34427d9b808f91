"""Ray Data's V1 Parquet reader, which the job reads its manifests and staged rows with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ray.data import DataContext


@contextmanager
def parquet_reader_v1() -> Iterator[None]:
    """Datasets made inside read Parquet with Ray Data's V1 reader (they keep the setting they were
    made with), and sample their files without a progress bar. Ray 2.60's V2 reader starts 32
    footer-reading actors for every read, seconds of start-up on a small machine (BENCHMARKS.md,
    "Where the job's time goes"), where V1 reads the few footers itself; and V2 hands
    `write_iceberg` a schema with its internal `__file_chunk_metadata` column (a null-typed list
    Iceberg refuses), whatever the blocks hold."""
    context = DataContext.get_current()
    saved = context.use_datasource_v2, context.enable_progress_bars
    context.use_datasource_v2 = context.enable_progress_bars = False
    try:
        yield
    finally:
        context.use_datasource_v2, context.enable_progress_bars = saved
