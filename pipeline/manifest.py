"""The input manifest (columns: README, Manifest): found, and validated before any work starts.

A manifest is one Parquet file or a folder of them, as Spark, Athena or Trino write a table,
partitioned in Hive folders (`label=1/`) or not. Validation streams the key columns batch by
batch, so a manifest's size is bounded only by the set of pair ids kept to find duplicates.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from pipeline.errors import UserError
from pipeline.io.storage import (
    CREDENTIAL_RULES,
    StorageOptions,
    is_folder,
    parent_uri,
    redact_uri,
    unusable_scheme,
)
from pipeline.io.tables import arrow_filesystem
from pipeline.schema import reserved_names

REQUIRED = ("pair_id", "query_uri", "reference_uri")
BBOX_COLUMNS = ("query_bbox", "reference_bbox")
FIRST_IMAGES = 8  # distinct image URIs of the first rows kept in ManifestInfo
_SCHEME = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"  # of a URI; paths have none
FOLDER_MARKER = "_$folder$"  # the empty objects Hadoop's S3 connectors write beside folders
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # a Hive folder name's null value (pyarrow's default null_fallback)


class ManifestError(UserError):
    """The manifest cannot be audited; the message names the problem."""


@dataclass(frozen=True)
class ManifestInfo:
    num_rows: int
    schema: pa.Schema
    has_boxes: bool
    first_images: tuple[str, ...]  # the first FIRST_IMAGES distinct URIs of the first rows, queries first, as given
    files: tuple[str, ...]  # its Parquet files' paths in their filesystem, in row order
    folder_columns: pa.Table  # each file's values of the Hive folder columns, a row per file; none without them


def manifest_dir(manifest: str) -> str:
    """The folder that a manifest's relative image URIs are read from: the one that holds the
    manifest (absolute or a URI, as JobConfig keeps it), whether that is a file or a folder of them."""
    return parent_uri(manifest)


def open_manifest(uri: str, options: StorageOptions) -> pds.Dataset:
    """The manifest at `uri`: one Parquet file, or a folder of them (in subfolders too), read in
    the order of their names. Names that start with _ or . are not data (Spark's _SUCCESS, .crc
    checksums, _temporary/), nor are Hadoop's `*_$folder$` markers; other files must be Parquet,
    whatever they are called (Athena's have no extension), and agree on the types of the columns
    they share. Files without rows are left out. Hive folder names inside the folder
    (`label=1/team=a%2Fb/`, HIVE_NULL for null) are columns too, after the files' own
    (_folder_schema), as Spark, Athena and Trino read such a table. StorageError when `uri` is
    not there."""
    folder = is_folder(uri, options)  # and StorageError first when it is not there
    fs, path = arrow_filesystem(uri, options)
    with _unreadable_as_manifest_error():
        found = pds.dataset(path, filesystem=fs, format="parquet")  # a folder: its files, _ and . skipped
        files = sorted((f for f in found.get_fragments() if not f.path.endswith(FOLDER_MARKER)), key=lambda f: f.path)
        if folder and not files:
            raise ManifestError(f"manifest folder {uri} holds no files (names starting with _ or . are skipped)")
        fragments = [f for f in files if f.metadata.num_rows > 0]
        in_files = _one_schema(fragments)
        folder_columns = _folder_schema([f.path for f in fragments], path, in_files) if folder else pa.schema([])
        schema = pa.schema([*in_files, *folder_columns])
        return pds.dataset([f.path for f in fragments], schema=schema, filesystem=fs, format="parquet",
                           partitioning=pds.partitioning(folder_columns, flavor="hive"), partition_base_dir=path)


@contextmanager
def _unreadable_as_manifest_error() -> Iterator[None]:
    """A damaged file, or a web server that cannot serve Parquet's byte ranges, as one ManifestError."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(f"manifest is not readable Parquet: {error}") from error
    except ValueError as error:
        if "range requests" not in str(error):  # fsspec's HTTP file: the server ignores Range headers
            raise
        raise ManifestError("manifest: its web server does not serve byte ranges, which Parquet is read in: "
                            "put the manifest on object storage or a local disk") from error


def _folder_schema(paths: list[str], base: str, in_files: pa.Schema) -> pa.Schema:
    """The Hive folder columns of the files at `paths` below the folder `base`: `name=value`
    folders, URL-encoded as Spark writes them, HIVE_NULL for null; int64 where every value is an
    integer (or null: Spark writes a table whose labels are all unknown so), otherwise string.
    pyarrow's own inference cannot type a column of nulls, and would make integers int32."""
    values: dict[str, list[str]] = {}
    for path in paths:
        for folder in posixpath.relpath(path, base).split("/")[:-1]:
            name, equals, value = folder.partition("=")
            if equals and name:
                values.setdefault(unquote(name), []).append(unquote(value))
    twice = sorted(set(values) & set(in_files.names))
    if twice:
        raise ManifestError(f"manifest column {twice[0]!r} is both in the files and in their folder names "
                            f"({twice[0]}=...); keep one")
    return pa.schema([pa.field(name, pa.int64() if all(_is_integer(v) for v in found if v != HIVE_NULL) else pa.string())
                      for name, found in values.items()])


def _is_integer(text: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None and -2**63 <= int(text) < 2**63


def _one_schema(fragments: list[pds.ParquetFileFragment]) -> pa.Schema:
    """The columns of all the files, each of one type: Ray reads each file with its own schema
    and cannot join int8 to int64, or a string to a number."""
    types: dict[str, tuple[pa.DataType, str]] = {}  # column -> (type, the first file that has it)
    for fragment in fragments:
        for field in fragment.physical_schema:
            first_type, first_file = types.setdefault(field.name, (field.type, fragment.path))
            if field.type != first_type:
                raise ManifestError(f"manifest files disagree on column {field.name!r}: {first_type} in {first_file}, "
                                    f"{field.type} in {fragment.path}; write them with one schema")
    return pa.schema([pa.field(name, kind) for name, (kind, _) in types.items()])


def _check_types(schema: pa.Schema, folder_columns: list[str]) -> None:
    missing = [name for name in REQUIRED if name not in schema.names]
    if missing:
        raise ManifestError(f"manifest lacks the required column(s) {', '.join(missing)}; it has {', '.join(schema.names)}")
    for name in REQUIRED:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            hint = (f" (a pandas categorical): write it as strings, df[{name!r}].astype(str)"
                    if pa.types.is_dictionary(kind) else "")
            raise ManifestError(f"manifest column {name!r} must be a string, not {kind}{hint}")
    expectations = {"label": pa.types.is_integer, "rank": pa.types.is_integer, "score": pa.types.is_floating}
    for name, is_expected in expectations.items():
        if name in schema.names and not is_expected(schema.field(name).type):
            hint = ("; pandas stores integers with nulls as floats: write the column as df['label'].astype('Int8')"
                    if name == "label" and pa.types.is_floating(schema.field(name).type) else
                    f", from folder names {name}=...: one of them is not a number" if name in folder_columns else "")
            raise ManifestError(f"manifest column {name!r} has type {schema.field(name).type}, expected "
                                f"{is_expected.__name__[3:]}{hint}")
    for name in BBOX_COLUMNS:
        if name in schema.names:
            kind = schema.field(name).type
            if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) or not pa.types.is_floating(kind.value_type):
                raise ManifestError(f"manifest column {name!r} must be a list of 4 floats (x0, y0, x1, y1), not {kind}")
    reserved = sorted(set(schema.names) & reserved_names())
    if reserved:
        raise ManifestError(f"manifest column(s) {', '.join(reserved)} collide with result columns; rename them")


def _check_labels(labels: pa.Array, first_row: int) -> None:
    """1 (the pair shows the same thing), 0 (it does not) or null (not known): a -1/+1 encoding
    would silently drop every negative pair out of the false-match figures."""
    bad = pc.and_(pc.is_valid(labels), pc.invert(pc.is_in(labels, pa.array([0, 1], labels.type))))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise ManifestError(f"manifest column 'label' row {first_row + row}: {labels[row].as_py()} is not 0, 1 or null "
                            "(1: the pair shows the same thing, 0: it does not)")


def _check_schemes(uris: pa.Array, name: str, first_row: int) -> None:
    """Every URI's scheme (s3://, gs://, ...) has a filesystem here: otherwise every row of it would fail."""
    schemes = pc.struct_field(pc.extract_regex(uris, _SCHEME), [0])  # null for paths
    for scheme in pc.unique(schemes).drop_null().to_pylist():
        reason = unusable_scheme(scheme.lower())
        if reason:
            row = first_row + pc.index(schemes, scheme).as_py()
            raise ManifestError(f"manifest column {name!r} row {row}: {reason}")


def _check_no_credentials(uris: pa.Array, name: str, first_row: int) -> None:
    """No URI holds user:password@ or a secret in its query (a presigned URL): the result table
    keeps the manifest's URIs as they are."""
    for pattern, what in CREDENTIAL_RULES:
        found = pc.match_substring_regex(uris, pattern, ignore_case=True)
        if pc.any(found).as_py():
            row = pc.index(found, True).as_py()
            raise ManifestError(f"manifest column {name!r} row {first_row + row}: {redact_uri(uris[row].as_py())} holds "
                                f"{what}, which the result table would keep with the row: give the images' own URIs "
                                "(s3://, gs://, ...) and the credentials through the environment, a profile or a role")


def _check_boxes(batch: pa.RecordBatch, name: str, first_row: int) -> float:
    """Checks the batch's boxes of column `name`; returns their largest coordinate (-inf without any)."""
    boxes = batch.column(name)
    lengths = pc.list_value_length(boxes)
    bad = pc.and_(pc.is_valid(boxes), pc.not_equal(lengths, 4))
    if pc.any(bad).as_py():
        row = first_row + pc.index(bad, True).as_py()
        raise ManifestError(f"manifest column {name!r} row {row}: a box has 4 numbers (x0, y0, x1, y1)")
    corners = pc.list_flatten(boxes).to_numpy(zero_copy_only=False).reshape(-1, 4)  # the non-null boxes, in order
    rows = first_row + np.flatnonzero(pc.is_valid(boxes).to_numpy(zero_copy_only=False))  # their rows
    unknown = ~np.isfinite(corners.astype(np.float64)).all(axis=1)  # a null corner reads as NaN
    if unknown.any():
        raise ManifestError(f"manifest column {name!r} row {rows[np.argmax(unknown)]}: box "
                            f"{corners[np.argmax(unknown)].tolist()} has a coordinate that is not a number; "
                            "a row without a box has null for the whole box")
    inverted = (corners[:, 2] < corners[:, 0]) | (corners[:, 3] < corners[:, 1])
    if inverted.any():
        row = rows[np.argmax(inverted)]
        raise ManifestError(f"manifest column {name!r} row {row}: box {corners[np.argmax(inverted)].tolist()} has x1 < x0 "
                            "or y1 < y0; boxes are (x0, y0, x1, y1), top-left and bottom-right corners")
    return float(corners.max()) if corners.size else -np.inf


def validate_manifest(manifest: pds.Dataset) -> ManifestInfo:
    """Checks columns, types, pair_id uniqueness and null URIs of an opened manifest
    (open_manifest); raises ManifestError."""
    with _unreadable_as_manifest_error():
        return _validate(manifest)


def _validate(manifest: pds.Dataset) -> ManifestInfo:
    schema = manifest.schema
    num_rows = manifest.count_rows()  # from the files' footers
    if num_rows == 0:  # first: an empty file's columns may have no types at all
        raise ManifestError("manifest has no rows")
    _check_types(schema, manifest.partitioning.schema.names)
    boxes = [name for name in BBOX_COLUMNS if name in schema.names]
    if len(boxes) == 1:
        raise ManifestError(f"manifest has {boxes[0]!r} but not {(set(BBOX_COLUMNS) - set(boxes)).pop()!r}: "
                            "the localisation columns need both boxes of each pair (or neither column)")
    labels = ["label"] if "label" in schema.names else []
    seen: set[str] = set()
    largest: dict[str, float] = {}  # each box column's largest coordinate
    first_row = 0
    first_images: tuple[str, ...] = ()
    for batch in manifest.to_batches(columns=[*REQUIRED, *labels, *boxes], batch_size=65_536):
        if batch.num_rows == 0:
            continue
        for name in REQUIRED:
            column = batch.column(name)
            empty = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(column), 0))
            if pc.any(empty).as_py():
                row = first_row + pc.index(empty, True).as_py()
                raise ManifestError(f"manifest column {name!r} is null or empty at row {row}")
        for name in ("query_uri", "reference_uri"):
            _check_schemes(batch.column(name), name, first_row)
            _check_no_credentials(batch.column(name), name, first_row)
        for pair_id in batch.column("pair_id").to_pylist():
            if pair_id in seen:
                raise ManifestError(f"manifest pair_id {pair_id[:80]!r} appears more than once; pair ids must be unique")
            seen.add(pair_id)
        if labels:
            _check_labels(batch.column("label"), first_row)
        for name in boxes:
            largest[name] = max(largest.get(name, -np.inf), _check_boxes(batch, name, first_row))
        if first_row == 0:
            head = batch.slice(0, FIRST_IMAGES)
            uris = [*head.column("query_uri").to_pylist(), *head.column("reference_uri").to_pylist()]
            first_images = tuple(dict.fromkeys(uris))[:FIRST_IMAGES]
        first_row += batch.num_rows
    for name, coordinate in largest.items():
        if 0 <= coordinate <= 1:  # a pixel box this small would cover one pixel at most, in every row
            raise ManifestError(f"manifest column {name!r}: every box lies within [0, 1], as normalised boxes do; "
                                "boxes are in pixels of the original image")
    return ManifestInfo(num_rows=num_rows, schema=schema, has_boxes=len(boxes) == 2, first_images=first_images,
                        files=tuple(manifest.files), folder_columns=_folder_columns(manifest))


def _folder_columns(manifest: pds.FileSystemDataset) -> pa.Table:
    """Each file's values of the manifest's Hive folder columns, a row per file (null where its
    folders do not name the column)."""
    schema = manifest.partitioning.schema
    values = [pds.get_partition_keys(fragment.partition_expression) for fragment in manifest.get_fragments()]
    return pa.table({field.name: pa.array([keys.get(field.name) for keys in values], field.type) for field in schema},
                    schema=schema)


def with_folder_columns(rows: pa.Table, files: Sequence[str], folder_columns: pa.Table) -> pa.Table:
    """`rows` read with the path of their file (column `path`, one of ManifestInfo.files), that
    column replaced by the file's folder columns (ManifestInfo.folder_columns)."""
    file_of_row = pc.index_in(rows.column("path"), value_set=pa.array(files, pa.string()))
    rows = rows.drop_columns(["path"])
    for name in folder_columns.column_names:
        rows = rows.append_column(folder_columns.schema.field(name), folder_columns.column(name).take(file_of_row))
    return rows
