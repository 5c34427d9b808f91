"""Each bad manifest is rejected, with its problem named, before any work starts."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.distributed.job import run_audit
from pipeline.io.storage import StorageError, StorageOptions
from pipeline.manifest import ManifestError, open_manifest, validate_manifest, with_folder_columns

OPTIONS = StorageOptions()


def parquet(table: pa.Table, folder: Path) -> pds.Dataset:
    path = folder / "pairs.parquet"
    pq.write_table(table, path)
    return open_manifest(str(path), OPTIONS)


def good(n: int = 3) -> dict:
    return {"pair_id": [f"p{i}" for i in range(n)], "query_uri": [f"q{i}.png" for i in range(n)],
            "reference_uri": [f"r{i}.png" for i in range(n)]}


BAD = {
    "missing column": (pa.table({k: v for k, v in good().items() if k != "reference_uri"}), "reference_uri"),
    "mistyped uri": (pa.table({**good(), "query_uri": [1, 2, 3]}), "'query_uri' must be a string"),
    "categorical uri": (pa.table({**good(), "query_uri": pa.array(good()["query_uri"]).dictionary_encode()}),
                        "'query_uri' must be a string, not dictionary<values=string, indices=int32, ordered=0> (a pandas "
                        "categorical): write it as strings, df['query_uri'].astype(str)"),
    "mistyped label": (pa.table({**good(), "label": ["yes", "no", "yes"]}), "'label'"),
    "float label (pandas, with nulls)": (pa.table({**good(), "label": [1.0, None, 0.0]}), "astype('Int8')"),
    "mistyped box": (pa.table({**good(), "query_bbox": ["a", "b", "c"], "reference_bbox": ["a", "b", "c"]}), "'query_bbox'"),
    "box of 3": (pa.table({**good(), "query_bbox": pa.array([[0.0, 0, 1, 1], [0.0, 1, 2], None], pa.list_(pa.float32())),
                           "reference_bbox": pa.array([None] * 3, pa.list_(pa.float32()))}), "row 1"),
    "inverted box": (pa.table({**good(), "query_bbox": pa.array([[0.0, 0, 1, 1], None, [5.0, 5, 1, 9]], pa.list_(pa.float32())),
                               "reference_bbox": pa.array([[0.0, 0, 1, 1]] * 3, pa.list_(pa.float32()))}),
                     "'query_bbox' row 2: box [5.0, 5.0, 1.0, 9.0] has x1 < x0"),
    "box with NaN": (pa.table({**good(), "query_bbox": pa.array([[0.0, 0, 1, 1], [float("nan"), 0, 10, 10], None],
                                                                 pa.list_(pa.float32())),
                               "reference_bbox": pa.array([[0.0, 0, 1, 1]] * 3, pa.list_(pa.float32()))}),
                     "'query_bbox' row 1: box [nan, 0.0, 10.0, 10.0] has a coordinate that is not a number"),
    "box with a null corner": (pa.table({**good(), "query_bbox": pa.array([[0.0, 0, 1, 1], None, [0.0, None, 1, 1]],
                                                                           pa.list_(pa.float32())),
                                         "reference_bbox": pa.array([[0.0, 0, 1, 1]] * 3, pa.list_(pa.float32()))}),
                               "'query_bbox' row 2: box [0.0, nan, 1.0, 1.0] has a coordinate that is not a number"),
    "normalised boxes": (pa.table({**good(), "query_bbox": pa.array([[0.1, 0.2, 0.5, 0.9], None, [0.0, 0, 1, 1]], pa.list_(pa.float32())),
                                   "reference_bbox": pa.array([[0.0, 0, 8, 8]] * 3, pa.list_(pa.float32()))}),
                         "'query_bbox': every box lies within [0, 1]"),
    "empty with boxes": (pa.table({**{k: pa.array([], pa.string()) for k in good()}, "query_bbox": pa.nulls(0),
                                   "reference_bbox": pa.nulls(0)}), "no rows"),
    "label of -1/+1": (pa.table({**good(), "label": pa.array([1, None, -1], pa.int8())}),
                       "'label' row 2: -1 is not 0, 1 or null"),
    "one box column": (pa.table({**good(), "query_bbox": pa.array([[0.0, 0, 1, 1]] * 3, pa.list_(pa.float32()))}),
                       "has 'query_bbox' but not 'reference_bbox'"),
    "duplicate pair_id": (pa.table({**good(), "pair_id": ["a", "b", "a"]}), "'a' appears more than once"),
    "null pair_id": (pa.table({**good(), "pair_id": ["a", None, "c"]}), "'pair_id' is null or empty at row 1"),
    "null uri": (pa.table({**good(), "reference_uri": ["x", "y", None]}), "'reference_uri' is null or empty at row 2"),
    "empty": (pa.table({k: pa.array([], pa.string()) for k in good()}), "no rows"),
    "reserved column": (pa.table({**good(), "similarity": [0.1, 0.2, 0.3]}), "similarity"),
    "unknown scheme": (pa.table({**good(), "reference_uri": ["s3://b/x.png", "r1.png", "foo://b/y.png"]}),
                       "'reference_uri' row 2: no filesystem reads foo:// URIs"),
    "scheme without its package": (pa.table({**good(), "query_uri": ["q0.png", "adl://store/q1.png", "q2.png"]}),
                                   "'query_uri' row 1: adl:// needs a package that is not installed"),
    # the rows failed, and the result table kept the key and secret in the passed-through column
    "credentials in a uri": (pa.table({**good(), "reference_uri": ["r0.png", "s3://b/r1.png", "s3://AKIA1:SECRET2@b/r2.png"]}),
                             "'reference_uri' row 2: s3://***@b/r2.png holds credentials (user:password@)"),
    # a presigned URL: the result table kept its signature and session token
    "presigned uri": (pa.table({**good(), "query_uri": ["q0.png", "https://b.s3.amazonaws.com/q1.png?x-amz-Signature=SIG9"
                                                        "&X-Amz-Security-Token=TOK9", "q2.png"]}),
                      "'query_uri' row 1: https://b.s3.amazonaws.com/q1.png?x-amz-Signature=***&X-Amz-Security-Token=*** "
                      "holds a secret in its query (a presigned URL's signature, a token or key)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_is_rejected(case: str, tmp_path: Path) -> None:
    table, message = BAD[case]
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_manifest(parquet(table, tmp_path))


def test_credentials_are_never_in_the_error(tmp_path: Path) -> None:
    for case, secrets in (("credentials in a uri", ("SECRET2", "AKIA1")), ("presigned uri", ("SIG9", "TOK9"))):
        with pytest.raises(ManifestError) as error:
            validate_manifest(parquet(BAD[case][0], tmp_path))
        assert not [secret for secret in secrets if secret in str(error.value)], case
    validate_manifest(parquet(pa.table({**good(), "query_uri": ["q@0.png", "s3://b/a@b.png", "https://h/x?u=a@b&monkey=1"]}),
                              tmp_path))  # an @ in a path or a query is no user; a parameter that ends in "key" no key


def test_not_parquet_or_not_there(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text("pair_id,query_uri\n1,2\n")
    with pytest.raises(ManifestError, match="not readable Parquet"):
        open_manifest(str(tmp_path / "pairs.csv"), OPTIONS)
    with pytest.raises(StorageError, match="nowhere.parquet: not found"):
        open_manifest(str(tmp_path / "nowhere.parquet"), OPTIONS)


def test_a_web_server_without_byte_ranges_is_named(tmp_path: Path) -> None:
    """Python's http.server ignores Range headers: reading Parquet from it ended in a traceback, exit 1."""
    pq.write_table(pa.table(good()), tmp_path / "pairs.parquet")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(ManifestError, match="does not serve byte ranges"):
                validate_manifest(open_manifest(f"http://127.0.0.1:{server.server_address[1]}/pairs.parquet", OPTIONS))
        finally:
            server.shutdown()


def spark_folder(folder: Path, parts: list[pa.Table]) -> Path:
    """A table as Spark writes it: part files, a _SUCCESS marker and .crc checksums; the second
    part without an extension, as Athena names its files."""
    folder.mkdir()
    for index, part in enumerate(parts):
        name = f"part-{index:05d}-c0ffee.snappy.parquet" if index == 0 else f"part-{index:05d}-c0ffee"
        pq.write_table(part, folder / name)
        (folder / f".{name}.crc").write_bytes(b"crc")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def test_a_folder_of_parquet_files_is_one_manifest(tmp_path: Path) -> None:
    first, second = pa.table(good(3)), pa.table({k: [f"b-{v}" for v in values] for k, values in good(4).items()})
    folder = spark_folder(tmp_path / "pairs.parquet", [first, second])
    info = validate_manifest(open_manifest(str(folder), OPTIONS))
    assert info.num_rows == 7 and [Path(f).name for f in info.files] == ["part-00000-c0ffee.snappy.parquet",
                                                                          "part-00001-c0ffee"]
    assert info.first_images == ("q0.png", "q1.png", "q2.png", "r0.png", "r1.png", "r2.png")  # the first file's

    repeated = spark_folder(tmp_path / "repeated", [first, pa.table(good(2))])
    with pytest.raises(ManifestError, match="'p0' appears more than once"):  # across the files
        validate_manifest(open_manifest(str(repeated), OPTIONS))
    markers_only = spark_folder(tmp_path / "markers-only", [])
    with pytest.raises(ManifestError, match="holds no files"):
        open_manifest(str(markers_only), OPTIONS)
    # files that agree: a column only the later file has, an empty file (pandas: null types), a Hadoop marker
    agreeing = spark_folder(tmp_path / "agreeing", [pa.table(good(2)), pa.table({**good(1), "pair_id": ["x"], "team": ["a"]})])
    pq.write_table(pa.table({k: pa.nulls(0) for k in good()}), agreeing / "part-00000-empty")
    (agreeing / "subfolder_$folder$").write_bytes(b"")
    info = validate_manifest(open_manifest(str(agreeing), OPTIONS))
    assert info.num_rows == 3 and "team" in info.schema.names and len(info.files) == 2
    disagreeing = spark_folder(tmp_path / "disagreeing", [pa.table({**good(2), "label": pa.array([1, 0], pa.int8())}),
                                                          pa.table({**good(1), "label": pa.array([1], pa.int64())})])
    with pytest.raises(ManifestError, match=r"disagree on column 'label': int8 in .*part-00000.*, int64 in "):
        open_manifest(str(disagreeing), OPTIONS)
    (folder / "notes.txt").write_text("not a part")
    with pytest.raises(ManifestError, match="not readable Parquet"):
        validate_manifest(open_manifest(str(folder), OPTIONS))


def hive_folder(folder: Path, parts: dict[str, pa.Table]) -> Path:
    """A table as Spark's partitionBy writes it: `parts` by their folder names (label=1/...)."""
    for name, part in parts.items():
        (folder / name).mkdir(parents=True)
        pq.write_table(part, folder / name / "part-00000.snappy.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def test_hive_folder_names_are_columns(tmp_path: Path) -> None:
    ids = {"label=1/team=a%2Fb": ["p0", "p1"], "label=0/team=c": ["p2"], "label=__HIVE_DEFAULT_PARTITION__/team=c": ["p3"]}
    parts = {name: pa.table({**good(len(pair_ids)), "pair_id": pair_ids}) for name, pair_ids in ids.items()}
    info = validate_manifest(open_manifest(str(hive_folder(tmp_path / "pairs", parts)), OPTIONS))
    assert info.schema.names == ["pair_id", "query_uri", "reference_uri", "label", "team"]
    assert (info.schema.field("label").type, info.schema.field("team").type) == (pa.int64(), pa.string())
    # files in the order of their names, each with its folders' values (URL-decoded, null for Hive's default)
    assert [Path(f).parent.name for f in info.files] == ["team=c", "team=a%2Fb", "team=c"]
    assert info.folder_columns.to_pylist() == [{"label": 0, "team": "c"}, {"label": 1, "team": "a/b"},
                                               {"label": None, "team": "c"}]
    # rows as Ray Data reads them, with their file's path, in any order of the files
    rows = pa.table({"pair_id": ["p3", "p0", "p2"], "path": [info.files[2], info.files[1], info.files[0]]})
    assert with_folder_columns(rows, info.files, info.folder_columns).to_pylist() == [
        {"pair_id": "p3", "label": None, "team": "c"}, {"pair_id": "p0", "label": 1, "team": "a/b"},
        {"pair_id": "p2", "label": 0, "team": "c"}]
    # the folder columns are checked as the files' are
    bad_label = hive_folder(tmp_path / "bad-label", {"label=2": pa.table(good(2))})
    with pytest.raises(ManifestError, match="'label' row 0: 2 is not 0, 1 or null"):
        validate_manifest(open_manifest(str(bad_label), OPTIONS))
    words = hive_folder(tmp_path / "words", {"label=1": pa.table(good(1)), "label=yes": pa.table({**good(1), "pair_id": ["y"]})})
    with pytest.raises(ManifestError, match="'label' has type string, expected integer, from folder names label=...: one"):
        validate_manifest(open_manifest(str(words), OPTIONS))
    # a table whose labels are all unknown: Spark writes one null folder, whose column has no value to type
    unknown = validate_manifest(open_manifest(str(hive_folder(tmp_path / "unknown", {
        "label=__HIVE_DEFAULT_PARTITION__": pa.table(good(2))})), OPTIONS))
    assert unknown.schema.field("label").type == pa.int64() and unknown.folder_columns.to_pylist() == [{"label": None}]
    twice = hive_folder(tmp_path / "twice", {"label=1": pa.table({**good(1), "label": pa.array([1], pa.int8())})})
    with pytest.raises(ManifestError, match=r"column 'label' is both in the files and in their folder names"):
        open_manifest(str(twice), OPTIONS)
    beside_path = hive_folder(tmp_path / "path-column", {"label=1": pa.table({**good(1), "path": ["x"]})})
    config = JobConfig.model_validate({"manifest": str(beside_path), "output": str(tmp_path / "out"),
                                       "model": {"arch": "resnet18"}})
    with pytest.raises(ManifestError, match="manifest column 'path' cannot be read beside Hive folder columns"):
        run_audit(config)  # before any work
    assert not (tmp_path / "out").exists()


def test_good_manifest_passes_with_extra_columns(tmp_path: Path) -> None:
    table = pa.table({**good(5), "label": pa.array([1, 0, 1, 0, 1], pa.int8()), "team": ["a"] * 5,
                      "query_bbox": pa.array([[0.0, 0, 10, 10]] * 5, pa.list_(pa.float32())),
                      "reference_bbox": pa.array([[0.0, 0, 10, 10]] * 5, pa.list_(pa.float32()))})
    info = validate_manifest(parquet(table, tmp_path))
    assert info.num_rows == 5 and info.has_boxes
    # the images the job looks for before it starts: distinct, queries first, at most 8
    assert info.first_images == ("q0.png", "q1.png", "q2.png", "q3.png", "q4.png", "r0.png", "r1.png", "r2.png")
    shared = validate_manifest(parquet(pa.table({**good(3), "query_uri": ["q.png"] * 3}), tmp_path))
    assert shared.first_images == ("q.png", "r0.png", "r1.png", "r2.png")


def test_job_rejects_bad_manifest_before_any_work(tmp_path) -> None:
    manifest = tmp_path / "pairs.parquet"
    pq.write_table(BAD["duplicate pair_id"][0], manifest)
    config = JobConfig.model_validate({"manifest": str(manifest), "output": str(tmp_path / "out"),
                                       "model": {"arch": "resnet18"}})
    with pytest.raises(ManifestError, match="more than once"):
        run_audit(config)  # no Ray is running: validation comes first
    assert not (tmp_path / "out").exists()
