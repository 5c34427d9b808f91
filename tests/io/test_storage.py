from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError, validated
from pipeline.io import storage
from pipeline.io.storage import (
    StorageError,
    StorageOptions,
    StorageUnavailable,
    exists,
    filesystem,
    glob,
    join_uri,
    move,
    parent_uri,
    read_bytes,
    redact_uri,
    remove_tree,
    resolve_uri,
    write_bytes,
)
from pipeline.io.tables import read_json


@pytest.fixture(params=["local", "file-uri", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> tuple[str, StorageOptions | None]:
    """A folder URI on each backend, and the options that reach it."""
    if request.param == "local":
        return str(tmp_path), None
    if request.param == "file-uri":
        return f"file://{tmp_path}", None
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/audits", options


def test_write_read_exists(root, rng: np.random.Generator) -> None:
    base, options = root
    data = rng.bytes(int(rng.integers(1, 300_000)))
    uri = join_uri(base, "runs", "r1", "blob.bin")
    assert not exists(uri, options)

    write_bytes(uri, data, options)

    assert exists(uri, options)
    assert read_bytes(uri, options) == data


def test_a_folder_named_like_a_glob_pattern_is_that_folder_only(root, rng: np.random.Generator) -> None:
    """An output root named `a[1]*?`: moving, listing and removing under it must not reach a
    sibling that the name matches as a pattern (`a1x_`), and must find its own files (object
    stores expand paths as globs: a[1]/x deleted a1/x)."""
    base, options = root
    named, sibling = join_uri(base, "a[1]*?"), join_uri(base, "a1x_")
    for folder in (named, sibling):
        for name in ("x/one.bin", "x/two.bin"):
            write_bytes(join_uri(folder, name), rng.bytes(16), options)
    move(join_uri(named, "x", "one.bin"), join_uri(named, "y", "one.bin"), options)
    assert glob(join_uri(named, "*", "*.bin"), options, under=named) == [
        join_uri(named, "x", "two.bin"), join_uri(named, "y", "one.bin")]
    remove_tree(join_uri(named, "x"), options)
    assert not exists(join_uri(named, "x", "two.bin"), options) and exists(join_uri(named, "y", "one.bin"), options)
    assert all(exists(join_uri(sibling, "x", name), options) for name in ("one.bin", "two.bin"))


def test_overwrite_is_visible(root, rng: np.random.Generator) -> None:
    base, options = root
    uri = join_uri(base, "obj.bin")
    first, second = rng.bytes(100), rng.bytes(200)
    write_bytes(uri, first, options)
    assert read_bytes(uri, options) == first
    write_bytes(uri, second, options)
    assert read_bytes(uri, options) == second


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_write_replaces_the_file_whole(tmp_path, scheme: str, rng: np.random.Generator) -> None:
    """Written beside and renamed into place: a reader that opened the old file reads all of it,
    never a truncated or half-written one, and nothing else is left in the folder."""
    uri = f"{scheme}{tmp_path}/run.json"
    old, new = rng.bytes(100_000), rng.bytes(50_000)
    write_bytes(uri, old)
    with open(tmp_path / "run.json", "rb") as reader:
        write_bytes(uri, new)
        assert reader.read() == old
    assert read_bytes(uri) == new and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_local_write_leaves_nothing_beside_its_target(tmp_path, rng: np.random.Generator) -> None:
    (tmp_path / "taken.png").mkdir()  # the rename into place fails: a folder has the name
    with pytest.raises(StorageError, match="taken.png"):
        write_bytes(f"{tmp_path}/taken.png", rng.bytes(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["taken.png"] and not any((tmp_path / "taken.png").iterdir())


def test_record_that_is_not_json_names_the_file(tmp_path) -> None:
    (tmp_path / "_SUCCESS").write_bytes(b'{"attempt": "a1"')  # cut short
    with pytest.raises(StorageError, match=r"_SUCCESS: not a valid JSON record"):
        read_json(str(tmp_path / "_SUCCESS"), StorageOptions())


def test_missing_object_names_uri(root) -> None:
    base, options = root
    uri = join_uri(base, "missing", "nothing.jpg")
    assert not exists(uri, options)
    with pytest.raises(StorageError) as info:
        read_bytes(uri, options)
    assert info.value.uri == uri
    assert uri in str(info.value) and "not found" in str(info.value)


def test_max_bytes(root, rng: np.random.Generator) -> None:
    base, options = root
    data = rng.bytes(int(rng.integers(10, 1000)))
    uri = join_uri(base, "sized.bin")
    write_bytes(uri, data, options)
    assert read_bytes(uri, options, max_bytes=len(data)) == data
    with pytest.raises(StorageError, match=f"larger than max_bytes={len(data) - 1}"):
        read_bytes(uri, options, max_bytes=len(data) - 1)


def test_missing_bucket(s3_bucket) -> None:
    _, options = s3_bucket
    uri = "s3://no-such-bucket-for-sfam-tests/x.parquet"
    with pytest.raises(StorageError, match="not found") as info:
        read_bytes(uri, options)
    assert uri in str(info.value)


def test_unknown_protocol_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="nosuchproto://bucket/x"):
        read_bytes("nosuchproto://bucket/x")


def test_options_to_fsspec_kwargs() -> None:
    options = StorageOptions(endpoint_url="http://127.0.0.1:9000", region="eu-west-1")
    s3 = options.fsspec_kwargs("s3")
    assert (s3["anon"], s3["client_kwargs"]) == (False, {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"})
    assert s3["config_kwargs"]["retries"]["max_attempts"] <= 2  # a wrong endpoint is reported in seconds
    anonymous = StorageOptions(anon=True).fsspec_kwargs("s3")
    assert (anonymous["anon"], anonymous["client_kwargs"]) == (True, {})
    assert options.fsspec_kwargs("file") == {"auto_mkdir": True}
    assert options.fsspec_kwargs("memory") == {}


def test_options_have_no_credential_fields() -> None:
    with pytest.raises(ValidationError):
        StorageOptions(key="AKIA", secret="s3cr3t")


def test_redact_uri() -> None:
    assert redact_uri("https://alice:s3cr3t@host:9000/b/x.jpg") == "https://***@host:9000/b/x.jpg"
    assert redact_uri("postgresql://alice:p@ss@host/db") == "postgresql://***@host/db"  # an @ in the password
    assert redact_uri("s3://bucket/alice@home.jpg") == "s3://bucket/alice@home.jpg"
    # AWS secret keys hold /: the whole of it goes, in URIs and in endpoints
    assert redact_uri("s3://AKIAKEY:wJal/K7MD/bPx@bucket/pairs.parquet") == "s3://***@bucket/pairs.parquet"
    assert redact_uri("error: http://minio:SEK/RET@127.0.0.1:9000 was not valid") == "error: http://***@127.0.0.1:9000 was not valid"
    assert redact_uri("http://user:p@ss/w0rd@h/x") == "http://***@h/x"
    assert (redact_uri("https://b.s3.amazonaws.com/x.jpg?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&v=2 next")
            == "https://b.s3.amazonaws.com/x.jpg?X-Amz-Credential=***&X-Amz-Signature=***&v=2 next")
    assert redact_uri("https://cdn/x.jpg?token=t0k3n#top") == "https://cdn/x.jpg?token=***#top"
    # botocore's message percent-encodes an s3:// key's query: "https://b.s3.amazonaws.com/a.png%3FX-Amz-Signature%3D..."
    assert (redact_uri('URL: "https://b.s3.amazonaws.com/a.png%3FX-Amz-Signature%3Dhunter2%26x-amz-credential%3DAK%2FIA"')
            == 'URL: "https://b.s3.amazonaws.com/a.png%3FX-Amz-Signature%3D***%26x-amz-credential%3D***"')


def test_errors_hide_userinfo() -> None:
    error = StorageError("https://alice:s3cr3t@host/x.jpg", "failed at https://alice:s3cr3t@host")
    assert "s3cr3t" not in str(error) and "alice" not in str(error)
    assert "host/x.jpg" in str(error)


@pytest.mark.parametrize(
    ("uri", "base_dir", "expected"),
    [
        ("img/a.jpg", "s3://bucket/audits", "s3://bucket/audits/img/a.jpg"),
        ("../img/a.jpg", "s3://bucket/audits/day1/", "s3://bucket/audits/img/a.jpg"),
        ("./a.jpg", "/data/manifests", "/data/manifests/a.jpg"),
        ("a.jpg", "file:///data/m", "file:///data/m/a.jpg"),
        ("a.jpg", "", "a.jpg"),
        ("/abs/a.jpg", "s3://bucket/audits", "/abs/a.jpg"),
        ("s3://other/a.jpg", "/data", "s3://other/a.jpg"),
        ("gs://b/c/a.jpg", "s3://bucket", "gs://b/c/a.jpg"),
        ("file:///x/a.jpg", "/data", "/x/a.jpg"),  # one file, one name: a run's manifest, compared images
        (Path("/x/a b/ü 图.png").as_uri(), "/data", "/x/a b/ü 图.png"),  # file:///x/a%20b/%C3%BC%20...
        ("file:///x/a b.png", "/data", "/x/a b.png"),  # unescaped, as people write them
        ("s3://b/a%20b.png", "/data", "s3://b/a%20b.png"),  # an object key holds what it holds
    ],
)
def test_resolve_uri(uri: str, base_dir: str, expected: str) -> None:
    assert resolve_uri(uri, base_dir) == expected


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket/audits/pairs.parquet", "s3://bucket/audits"), ("s3://bucket/pairs", "s3://bucket"),
    ("s3://bucket", "s3://bucket"),  # a folder manifest at a bucket's root: its images are in that bucket
    ("/data/pairs.parquet", "/data"), ("/pairs.parquet", "/"),
    ("file:///data/pairs", "file:///data"),
])
def test_parent_uri(uri: str, expected: str) -> None:
    assert parent_uri(uri) == expected


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/out/", ("runs", "r1/", "run.json"), "s3://bucket/out/runs/r1/run.json"),
        ("/tmp/out", ("/png/",), "/tmp/out/png"),
        ("file:///tmp/out", ("a",), "file:///tmp/out/a"),
    ],
)
def test_join_uri(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_uri(base, *parts) == expected


def test_unreachable_endpoint_is_storage_unavailable_and_drops_the_client(monkeypatch) -> None:
    """Not 'not found' (the job relies on this to tell an outage from a missing manifest), and
    the process's next call gets a new client instead of the connections that failed."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNREACHABLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    uri = "s3://audits/pairs.parquet"
    client = filesystem(uri, options)[0]
    assert filesystem(uri, options)[0] is client  # clients are cached per process
    with pytest.raises(StorageUnavailable, match="endpoint unreachable"):
        exists(uri, options)
    assert filesystem(uri, options)[0] is not client


def test_an_http_image_on_a_host_that_refuses_is_that_uri_s_error_not_not_found(tmp_path) -> None:
    """fsspec's HTTP filesystem says FileNotFoundError for a refused connection: the error says the
    host did not answer (a StorageError, so only the rows of that host fail), and a real 404 is not found."""
    (tmp_path / "here.png").write_bytes(b"picture")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert read_bytes(f"{base}/here.png") == b"picture"
        with pytest.raises(StorageError, match=r"/gone.png: not found$"):
            read_bytes(f"{base}/gone.png")
        server.shutdown()
    with pytest.raises(StorageError, match=r"/here.png: cannot connect \(ClientConnectorError: Cannot connect to host") as info:
        read_bytes(f"{base}/here.png")
    assert not isinstance(info.value, StorageUnavailable)


def test_a_fifo_or_a_device_is_refused_without_reading(tmp_path) -> None:
    """An image URI that named a FIFO held the job until it was killed; /dev/zero was read for 400 MB."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for uri in (str(fifo), "/dev/zero"):
        with pytest.raises(StorageError, match="not a regular file"):
            read_bytes(uri, max_bytes=1 << 20)


def test_an_endpoint_that_never_answers_is_storage_unavailable(monkeypatch) -> None:
    """An endpoint that accepts connections and then says nothing (a hung proxy) fails within the
    read timeout's retries instead of holding the job for minutes per request."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASILENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "silent")
    monkeypatch.setattr(storage, "READ_TIMEOUT_SECONDS", 0.2)
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(32)

        def accept_and_hold() -> None:
            with contextlib.suppress(OSError):  # the server closed at the end of the test
                while True:
                    accepted.append(server.accept()[0])
        threading.Thread(target=accept_and_hold, daemon=True).start()
        options = StorageOptions(endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}", region="us-east-1")
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="endpoint unreachable .*Read timeout"):
            exists("s3://audits/pairs.parquet", options)
    assert time.monotonic() - started < 60  # about 5 s; s3fs's own read timeout took 235 s
    assert accepted  # it did connect: the reads timed out, not the connection
    for connection in accepted:
        connection.close()


def test_a_retry_after_a_connection_error_gets_a_new_client(s3_bucket, monkeypatch) -> None:
    """Each try asks for the filesystem again, so a retry does not use the connections that failed."""
    bucket, options = s3_bucket
    uri = f"s3://{bucket}/audits/runs/r/_SUCCESS"
    write_bytes(uri, b'{"attempt": "a"}', options)
    monkeypatch.setattr(storage, "RETRY_BACKOFF_SECONDS", 0.0)

    def break_the_current_client() -> None:
        def refuse(*args, **kwargs):
            raise ConnectionError("connection reset by peer")
        client = filesystem(uri, options)[0]
        for method in ("open", "exists"):
            monkeypatch.setattr(client, method, refuse)

    break_the_current_client()
    assert exists(uri, options, retried=True)
    break_the_current_client()
    assert read_bytes(uri, options) == b'{"attempt": "a"}'
    break_the_current_client()
    with pytest.raises(StorageUnavailable, match="connection reset by peer"):
        exists(uri, options)  # not retried: a first look fails fast


def test_an_object_replaced_while_it_is_read_is_read_again(s3_bucket, monkeypatch) -> None:
    """A commit rewrites _SUCCESS while a reader (`sfam report`, a query) reads it: s3fs reads the
    version it opened and fails on the new one (FileExpired); the reader gets the new object whole."""
    bucket, options = s3_bucket
    uri = f"s3://{bucket}/audits/runs/r/_SUCCESS"
    write_bytes(uri, b'{"attempt": "old"}', options)
    fs, _ = filesystem(uri, options)
    opened = fs.open
    replaced: list[bool] = []

    def open_then_replace(path, *args, **kwargs):
        handle = opened(path, *args, **kwargs)
        if not replaced:  # the commit, between the reader's open and its read
            replaced.append(True)
            write_bytes(uri, b'{"attempt": "new, longer"}', options)
        return handle

    monkeypatch.setattr(fs, "open", open_then_replace)
    assert read_bytes(uri, options) == b'{"attempt": "new, longer"}' and replaced


@pytest.mark.parametrize("uri", ["s3://AKIAUSER:SUPERSECRET123@bucket/pairs.parquet", "gs://me:SUPERSECRET123@bucket/x"])
def test_an_object_store_uri_with_credentials_is_refused_without_printing_them(uri: str) -> None:
    """A new user's s3://KEY:SECRET@bucket/... printed the secret in botocore's invalid bucket name error."""
    with pytest.raises(StorageError, match=r"://\*\*\*@bucket/.*: credentials in a (s3|gs):// URI .* are never used") as error:
        read_bytes(uri)
    assert "SUPERSECRET123" not in str(error.value)


def test_an_endpoint_is_an_http_url_without_credentials() -> None:
    """127.0.0.1:9000 (DuckDB's ENDPOINT form) was blamed on the manifest; user:password@ got botocore's message."""
    with pytest.raises(ValidationError, match=r"'127.0.0.1:9000' is not an http:// or https:// URL"):
        StorageOptions(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ConfigError, match=r"storage_options: endpoint_url: http://\*\*\*@127.0.0.1:9000 holds credentials") as error:
        validated(StorageOptions, {"endpoint_url": "http://AKIA1:SECRET2@127.0.0.1:9000"}, "storage_options")
    assert "SECRET2" not in str(error.value)  # the config's one line, without pydantic's echo of the input
    assert StorageOptions(endpoint_url="https://s3.eu-west-1.amazonaws.com").endpoint_url.startswith("https://")
    assert StorageOptions(endpoint_url="HTTP://127.0.0.1:9000").endpoint_url  # schemes are case-insensitive
    for keys in ({"key": "AKIA1", "secret": "SECRET2"}, {"aws_session_token": "SECRET2"}, {"profile": "dev"}):
        with pytest.raises(ConfigError, match=f"storage_options: {', '.join(keys)}: credentials never go into the config"):
            validated(StorageOptions, keys, "storage_options")


def test_a_redacted_url_keeps_the_quote_around_it() -> None:
    assert redact_uri("e.g. 'https://h/x.png?X-Amz-Signature=abc&k=1'") == "e.g. 'https://h/x.png?X-Amz-Signature=***&k=1'"
    assert redact_uri('"https://h/x.png?token=abc"') == '"https://h/x.png?token=***"'


def test_a_scheme_without_a_filesystem_is_named() -> None:
    with pytest.raises(StorageError, match=r"^foo://b/x.png: no filesystem reads foo:// URIs"):
        read_bytes("foo://b/x.png")
    with pytest.raises(StorageError, match="adl:// needs a package that is not installed"):
        read_bytes("adl://store/x.png")
