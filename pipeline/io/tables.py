"""Files the job reads and writes whole: JSON run records; Arrow filesystems for Ray."""

from __future__ import annotations

import json

import fsspec.implementations.local
import pyarrow.fs as pafs

from pipeline.io.storage import StorageError, StorageOptions, filesystem, read_bytes, write_bytes


def arrow_filesystem(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` (what Ray's readers and writers take), and the path: Arrow's
    own for local files, fsspec's (with the storage options) for the rest."""
    fs, path = filesystem(uri, options)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def write_json(uri: str, record: dict, options: StorageOptions) -> None:
    write_bytes(uri, json.dumps(record, indent=2, sort_keys=True, default=str).encode(), options)


def read_json(uri: str, options: StorageOptions) -> dict:
    """The JSON object at `uri`; one that is not JSON is a StorageError naming it."""
    try:
        return json.loads(read_bytes(uri, options))
    except ValueError as error:
        raise StorageError(uri, f"not a valid JSON record ({error}); remove or repair it") from error
