"""Parquet tables on any fsspec filesystem: the manifest, the result table, run records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from pipeline.io.storage import StorageOptions, filesystem, read_bytes, write_bytes


def arrow_filesystem(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over fsspec's for `uri` (what Ray's readers and writers take), and the path."""
    fs, path = filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def open_input(uri: str, options: StorageOptions):
    """A seekable binary file for `uri` (for pyarrow.parquet.ParquetFile)."""
    fs, path = filesystem(uri, options)
    return fs.open(path, "rb")


def remove_tree(uri: str, options: StorageOptions) -> None:
    """Deletes `uri` and everything below it; nothing there is fine."""
    fs, path = filesystem(uri, options)
    fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def glob(pattern: str, options: StorageOptions) -> list[str]:
    """Paths matching a glob pattern, as URIs with the pattern's scheme."""
    fs, path = filesystem(pattern, options)
    fs.invalidate_cache()
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return [scheme + match for match in fs.glob(path)]


def read_results(root: str, options: StorageOptions, columns: list[str] | None = None,
                 run_id: str | None = None) -> pa.Table:
    """The Hive-partitioned result table under `root` (optionally one run's rows)."""
    fs, path = arrow_filesystem(root, options)
    fs_path = path.rstrip("/")
    dataset = pds.dataset(fs_path, filesystem=fs, format="parquet", partitioning="hive")
    where = (pds.field("run_id") == run_id) if run_id is not None else None
    return dataset.to_table(columns=columns, filter=where)


def write_json(uri: str, record: dict, options: StorageOptions) -> None:
    write_bytes(uri, json.dumps(record, indent=2, sort_keys=True, default=str).encode(), options)


def read_json(uri: str, options: StorageOptions) -> dict:
    return json.loads(read_bytes(uri, options))
