"""The result table as an Apache Iceberg table: each run's rows replaced in one atomic snapshot.

    table: {format: iceberg, identifier: sfam.results, catalog: {...pyiceberg properties...}}

The catalog defaults to an embedded SQLite catalog at {output}/iceberg/catalog.db with its
warehouse at {output}/iceberg/warehouse, for a local output; for object storage give a
catalog (`uri` of a SQLite file on the driver's disk, or `type: rest` / `type: glue` and
their properties). The S3 endpoint and region come from `storage_options`; credentials,
as everywhere, from the environment.

Rows are staged as Parquet under the attempt's folder like the Hive table's; the commit
(the job's Ray Data write, pipeline/distributed/iceberg_commit.py) writes them into the
table with an overwrite of `run_id = ID`: one snapshot deletes the run's old rows and adds
the new ones, so a reader sees the old run or the new one, never a mix. `_SUCCESS` is
written after that snapshot: an attempt killed between the two has replaced the run's rows
in the current snapshot without committing. `read` therefore reads the attempt `_SUCCESS`
names, from the newest snapshot that holds it; readers outside this project keep the rows
whose `attempt` is the one `_SUCCESS` names (docs/cluster.md). Once `_SUCCESS` is written,
the attempt's staged files, a copy of what the table holds, are deleted. New columns evolve the
table's schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.errors import UserError
from pipeline.io.results_store import ResultsStore
from pipeline.io.storage import PASSWORD_IN_URI, StorageError, StorageOptions, join_uri, redact_uri
from pipeline.layout import RunLayout, run_dir_uri

CATALOG_NAME = "sfam"
# catalog property names that carry secrets (pyiceberg's: s3.secret-access-key, adls.account-key,
# adls.connection-string, adls.sas-token, header.Authorization, ...)
_SECRET_WORDS = ("secret", "password", "token", "credential", "access-key", "session", "account-key",
                 "connection-string", "authorization", "header.")


class TableConfig(BaseModel):
    """The config's `table` section: which table format the results go to."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["hive", "iceberg"] = "hive"
    identifier: str = "sfam.results"  # iceberg: namespace.table
    catalog: dict[str, str] = {}  # iceberg: pyiceberg catalog properties; {} = embedded SQLite

    @field_validator("catalog")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        secret = [key for key, text in value.items()
                  if any(word in key.lower() for word in _SECRET_WORDS) or re.match(PASSWORD_IN_URI, text)]
        if secret:
            raise ValueError(f"{', '.join(secret)}: credentials never go into the config (a secret's name, or "
                             "user:password@ in a URI: a user alone may stay, with PGPASSWORD or the like in the "
                             "environment); use the environment, a profile or a role")
        return value


def catalog_properties(table: TableConfig, output: str, options: StorageOptions) -> dict[str, str]:
    """pyiceberg catalog properties: the config's, or the embedded SQLite default; S3 settings added."""
    properties = dict(table.catalog)
    if not properties:
        if "://" in output and not output.startswith("file://"):
            raise UserError(f"table.catalog: an embedded SQLite catalog needs a local output, not {output}; "
                            "give table.catalog (a SQLite uri on local disk with a warehouse, or a REST / Glue catalog)")
        root = os.path.abspath(output.removeprefix("file://"))
        properties = {"type": "sql", "uri": f"sqlite:///{join_uri(root, 'iceberg', 'catalog.db')}",
                      "warehouse": f"file://{join_uri(root, 'iceberg', 'warehouse')}"}
    if options.endpoint_url:
        properties.setdefault("s3.endpoint", options.endpoint_url)
    if options.region:
        properties.setdefault("s3.region", options.region)
    return properties


def iceberg_rows(rows: pa.Table, run_id: str, run_date: str) -> pa.Table:
    """Staged rows as the Iceberg table holds them: with run_id and run_date."""
    rows = rows.append_column("run_date", pa.array([run_date] * rows.num_rows, pa.string()))
    return rows.append_column("run_id", pa.array([run_id] * rows.num_rows, pa.string()))


class IcebergStore(ResultsStore):
    """The result table in an Iceberg catalog.

    overwrite_run: writes an attempt's staged rows as the run's rows in one snapshot (the
        job passes its Ray Data writer); a store without one only reads.
    """

    def __init__(self, output: str, options: StorageOptions, table: TableConfig,
                 overwrite_run: Callable[[IcebergStore, RunLayout], None] | None = None) -> None:
        super().__init__(output, options)
        self.identifier = table.identifier
        self.properties = catalog_properties(table, output, options)
        self.overwrite_run = overwrite_run

    def catalog(self) -> Any:
        """The catalog; a SQLite catalog on local disk gets its folder where the store commits (a
        reader makes no catalog: SQLite would create an empty one). Failing: a UserError naming it."""
        from pyiceberg.catalog import load_catalog  # loads only where the Iceberg table is used

        uri = self.properties.get("uri", "")
        sqlite_file = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
        if sqlite_file and self.overwrite_run is None and not os.path.exists(sqlite_file):
            raise UserError(f"Iceberg table {self.identifier}: not found (no catalog at {sqlite_file}: no run has "
                            "succeeded into it)")
        try:
            if sqlite_file:
                os.makedirs(os.path.dirname(sqlite_file) or ".", exist_ok=True)
            return load_catalog(CATALOG_NAME, **self.properties)
        except Exception as error:
            raise UserError(f"table.catalog: cannot open the Iceberg catalog at {redact_uri(uri) or 'its uri'}: "
                            f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error

    def prepare(self) -> None:
        self.catalog()

    def create_table_for(self, schema: pa.Schema) -> None:
        """Creates the namespace and the table (partitioned by run_id) when they do not exist yet."""
        catalog = self.catalog()
        namespace = self.identifier.rsplit(".", 1)[0]
        catalog.create_namespace_if_not_exists(namespace)
        if catalog.table_exists(self.identifier):
            return
        table = catalog.create_table(self.identifier, schema=schema)
        with table.update_spec() as spec:
            spec.add_identity("run_id")

    def _publish(self, layout: RunLayout) -> None:
        if self.overwrite_run is None:
            raise UserError(f"the Iceberg table {self.identifier} was opened to read, not to commit")
        self.overwrite_run(self, layout)

    def _read(self, run_id: str, attempt: str, columns: list[str] | None, pair_ids: list[str] | None) -> pa.Table:
        """The rows of the attempt that `_SUCCESS` names, from the newest snapshot that holds them: an
        attempt stopped between its snapshot and its `_SUCCESS` has replaced them in the current one."""
        from pyiceberg.expressions import And, EqualTo, In

        where_run = run_dir_uri(self.output, run_id)
        if self._table_format(run_id) == "hive":  # before looking through every snapshot for it
            raise StorageError(where_run, f"no rows in the Iceberg table {self.identifier}; the run's record says "
                               "table.format: hive: read it without the config's table section")
        table = self._table()
        committed: Any = And(EqualTo("run_id", run_id), EqualTo("attempt", attempt))
        snapshot = next((s for s in sorted(table.snapshots(), key=lambda s: s.timestamp_ms, reverse=True)
                         if table.scan(row_filter=committed, selected_fields=("attempt",), snapshot_id=s.snapshot_id,
                                       limit=1).to_arrow().num_rows), None)
        if snapshot is None:  # a committed run has rows: in snapshots since expired, or another table
            raise StorageError(where_run, f"no rows of its committed attempt {attempt} in any snapshot of the Iceberg "
                               f"table {self.identifier} (expired, or another table)")
        names = set(table.schemas().get(snapshot.schema_id, table.schema()).column_names)
        present = ("*",) if columns is None else tuple(c for c in columns if c in names)
        where = committed if pair_ids is None else And(committed, In("pair_id", pair_ids))
        return table.scan(row_filter=where, selected_fields=present, snapshot_id=snapshot.snapshot_id).to_arrow()

    def _table(self) -> Any:
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog().load_table(self.identifier)
        except NoSuchTableError as error:
            raise UserError(f"Iceberg table {self.identifier}: not found (no run has succeeded into it)") from error
