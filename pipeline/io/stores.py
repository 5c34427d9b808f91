"""Which results store the config's `table` section names."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.io.iceberg_store import IcebergStore, TableConfig
from pipeline.io.results_store import HiveParquetStore, ResultsStore
from pipeline.io.storage import StorageOptions
from pipeline.layout import RunLayout


def open_results_store(output: str, options: StorageOptions, table: TableConfig | None = None,
                       overwrite_run: Callable[[IcebergStore, RunLayout], None] | None = None) -> ResultsStore:
    """The Hive table under `output` (the default), or the Iceberg table the config names.

    overwrite_run: the Iceberg commit (the job's); readers leave it out.
    """
    table = table or TableConfig()
    if table.format == "iceberg":
        return IcebergStore(output, options, table, overwrite_run)
    return HiveParquetStore(output, options)
