"""The Iceberg table's commit through Ray Data: an attempt's staged rows become its run's rows.

One `write_iceberg` with an overwrite of `run_id = ID`: the workers write the data files,
the driver commits the deletion of the run's old rows and the new files in one snapshot.
"""

from __future__ import annotations

import warnings

import pyarrow as pa
import ray
from ray.data import SaveMode
from ray.data.expressions import col

from pipeline.distributed.parquet_reader import parquet_reader_v1
from pipeline.io.iceberg_store import CATALOG_NAME, IcebergStore, iceberg_rows
from pipeline.layout import RunLayout


class _AsIcebergRows:
    """Ray Data callable: staged rows (only their own columns, none of the reader's) -> the table's rows."""

    def __init__(self, columns: list[str], run_id: str, run_date: str) -> None:
        self.columns, self.run_id, self.run_date = columns, run_id, run_date

    def __call__(self, batch: pa.Table) -> pa.Table:
        return iceberg_rows(batch.select(self.columns), self.run_id, self.run_date)


def overwrite_run(store: IcebergStore, layout: RunLayout) -> None:
    """Replaces the rows of `layout.run_id` in the table by the attempt's staged rows, atomically."""
    staged = store.staged_schema(layout)
    store.create_table_for(iceberg_rows(staged.empty_table(), layout.run_id, layout.run_date).schema)
    fs, path = store.staging(layout)
    with parquet_reader_v1():
        rows = ray.data.read_parquet(path, filesystem=fs).map_batches(
            _AsIcebergRows(staged.names, layout.run_id, layout.run_date), batch_format="pyarrow")
    with warnings.catch_warnings():  # a run's first commit has no old rows to delete: pyiceberg warns of that
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        rows.write_iceberg(store.identifier, catalog_kwargs={"name": CATALOG_NAME, **store.properties},
                           mode=SaveMode.OVERWRITE, overwrite_filter=col("run_id") == layout.run_id)
