"""Object storage access through fsspec: the only module that talks to it.

Every other module receives bytes from here. Credentials never appear in
:class:`StorageOptions`; they come from the environment or the provider's
default chain (for S3: env variables, shared config files, instance roles).
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote

import fsspec
from fsspec.utils import get_protocol
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from pipeline.errors import UserError

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")
T = TypeVar("T")
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # whose URIs name a bucket, never a user
# user:password@ up to the last @ of the URI (a password may hold / and @), or a user@ without a password
_USERINFO = re.compile(r"(://)(?:[^\s/@:]*:\S*|[^\s/@]*)@")
# storage option names that carry credentials: s3fs's key, secret, token; boto's aws_* ones
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "profile")
_CREDENTIALS_ELSEWHERE = ("credentials never go into the config; use the environment (AWS_PROFILE, or "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or a role")
# a URI that holds user:password@ (or user@) before its host: refused wherever it would be kept;
# one with a password alone where a user is a name, not a secret (a SQL catalog's postgresql://auditor@db/c)
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"
_CREDENTIALS_IN_URI = _SCHEME + r"[^/?#]*@"
PASSWORD_IN_URI = _SCHEME + r"[^/?#@:]*:[^/?#]*@"
# query parameters that carry secrets (presigned URLs of S3, GCS and Azure, tokens, keys)
_SECRET_PARAMETERS = (r"(?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|sig|"
                      r"signature|token|access_token|api_?key|key|password|secret)")
# a URI whose query holds one: refused where the URI would be kept (pyarrow's regex, with ignore_case)
_SECRET_IN_QUERY = rf"[?&]{_SECRET_PARAMETERS}="
# their values, also percent-encoded (%3F ? %26 & %3D =: botocore's messages quote an s3:// key's ? so),
# up to a quote that encloses the URL in a message
_SECRET_QUERY = re.compile(rf"((?:[?&]|%3F|%26){_SECRET_PARAMETERS}(?:=|%3D))(?:(?!%26)[^&\s#'\"])*", re.IGNORECASE)
# what a URI kept in a config or the result table may not hold (each pattern searched case-insensitively)
CREDENTIAL_RULES = ((_CREDENTIALS_IN_URI, "credentials (user:password@)"),
                    (_SECRET_IN_QUERY, "a secret in its query (a presigned URL's signature, a token or key)"))


class StorageError(UserError):
    """An object could not be read or written. The message names the URI and the reason."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = redact_uri(uri)
        self.reason = redact_uri(reason)
        super().__init__(f"{self.uri}: {self.reason}")


class StorageUnavailable(StorageError):
    """The storage endpoint could not be reached (after retries): the job, not the row, fails."""


# connection failures raised by botocore / aiohttp, named so that this module needs neither
_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
}
RETRIES = 3
RETRY_BACKOFF_SECONDS = 2.0
REREADS = 3  # reads of an object that was replaced while it was read, before its error
CONNECT_TIMEOUT_SECONDS = 5
# s3fs tries each request 5 times and botocore twice per try: an endpoint that accepts connections and
# then says nothing fails a first look (exists) after 86 s here, where s3fs's own 15 s took 235 s
READ_TIMEOUT_SECONDS = 5


def _is_connection_error(error: BaseException) -> bool:
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ in _CONNECTION_ERRORS for cls in type(error).__mro__
    )


def _retrying(uri: str, options: StorageOptions | None, operation: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
    """Runs `operation` on the filesystem that holds `uri` and its path there, retrying with
    exponential backoff while the endpoint is unreachable. Each try asks for the filesystem
    again: after a connection error that is a new client (see _storage_errors)."""
    for attempt in range(RETRIES):
        try:
            return operation(*filesystem(uri, options))
        except StorageUnavailable:
            if attempt == RETRIES - 1:
                raise
            time.sleep(RETRY_BACKOFF_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


class StorageOptions(BaseModel):
    """Non-secret settings for remote filesystems (the job config's `storage_options`)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: object) -> object:
        """Keys, secrets and tokens (s3fs's key=, secret=, token=) are refused by name, with where they go."""
        secret = [name for name in data if any(word in str(name).lower() for word in _CREDENTIAL_WORDS)] \
            if isinstance(data, dict) else []
        if secret:
            raise ValueError(f"{', '.join(map(str, secret))}: {_CREDENTIALS_ELSEWHERE}")
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _a_url_without_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(r"^https?://[^/?#]", value, re.IGNORECASE):
            raise ValueError(f"{value!r} is not an http:// or https:// URL: write it with its scheme, "
                             "e.g. http://127.0.0.1:9000")
        return without_credentials(value)

    def fsspec_kwargs(self, protocol: str) -> dict:
        """Keyword arguments for the fsspec filesystem of `protocol`.

        Only S3 uses these options; local files get `auto_mkdir` so writes create
        parent folders; any other protocol gets no arguments.
        """
        if protocol in _S3_PROTOCOLS:
            client_kwargs = {"endpoint_url": self.endpoint_url, "region_name": self.region}
            return {
                "anon": self.anon,
                "client_kwargs": {k: v for k, v in client_kwargs.items() if v is not None},
                # botocore retries a connection once; this module's own retries handle outages
                "config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "read_timeout": READ_TIMEOUT_SECONDS,
                                  "retries": {"max_attempts": 2, "mode": "standard"}},
            }
        if protocol in _LOCAL_PROTOCOLS:
            return {"auto_mkdir": True}
        return {}


def unusable_scheme(scheme: str) -> str | None:
    """Why no filesystem here reads `scheme://` URIs (unknown to fsspec, or its package is not
    installed), or None where one does."""
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        return f"no filesystem reads {scheme}:// URIs (fsspec knows s3, gs, az, http(s), file, ...)"
    except ImportError as error:
        return f"{scheme}:// needs a package that is not installed: {error}"
    return None


def is_local(uri: str) -> bool:
    """Whether `uri` is a file on this machine's filesystem (a path or file://)."""
    return get_protocol(uri) in _LOCAL_PROTOCOLS


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds `uri` and the path of `uri` inside it. An object store's URI with
    credentials before its bucket is refused: they would not be used, and its errors would print them."""
    options = options or StorageOptions()
    protocol = get_protocol(uri)
    if protocol in _OBJECT_STORES and _USERINFO.search(uri):
        raise StorageError(uri, f"credentials in a {protocol}:// URI (user:password@ before the bucket) are never "
                                "used: give them in the environment, a profile or a role")
    unusable = unusable_scheme(protocol)
    if unusable:
        raise StorageError(uri, unusable)
    with _storage_errors(uri):
        return fsspec.core.url_to_fs(uri, **options.fsspec_kwargs(protocol))


def read_bytes(uri: str, options: StorageOptions | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object; refuses objects larger than `max_bytes` without reading them all.

    Retries while the endpoint is unreachable, then raises StorageUnavailable; reads again an
    object replaced while it was read (up to REREADS times).
    """
    def read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
        if is_local(uri):
            _refuse_special_file(uri, path)
        for attempt in range(REREADS):
            try:
                with _storage_errors(uri), fs.open(path, "rb") as f:
                    return f.read() if max_bytes is None else f.read(max_bytes + 1)
            except StorageError as error:
                # s3fs reads the version it opened: one replaced meanwhile (a commit rewrote _SUCCESS) is read anew
                if type(error.__cause__).__name__ != "FileExpired" or attempt == REREADS - 1:
                    raise
                fs.invalidate_cache(path)
        raise AssertionError("unreachable")

    data = _retrying(uri, options, read)
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(uri, f"larger than max_bytes={max_bytes}")
    return data


def _refuse_special_file(uri: str, path: str) -> None:
    """A FIFO would block the read for ever, a device (/dev/zero) never end: only files and folders are read."""
    with _storage_errors(uri):
        mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise StorageError(uri, "not a regular file (a FIFO, a device or a socket)")


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Create or replace the object, whole or not at all (local parent folders are created);
    retries like read_bytes. A local file is written beside and renamed into place, as an
    object store's PUT replaces an object: a crash never leaves half a record."""
    local = is_local(uri)

    def write(fs: fsspec.AbstractFileSystem, path: str) -> None:
        written = f"{path}.partial-{secrets.token_hex(4)}" if local else path
        with _storage_errors(uri):
            try:
                with fs.open(written, "wb") as f:
                    f.write(data)
                if local:
                    os.replace(written, path)
            finally:
                if local and os.path.lexists(written):  # the write or the rename failed, or was interrupted
                    os.remove(written)

    _retrying(uri, options, write)


def exists(uri: str, options: StorageOptions | None = None, *, retried: bool = False) -> bool:
    """Whether the object or folder exists. Retried like read_bytes where `retried`; otherwise a
    first look that fails at once on an unreachable endpoint (to fail fast, before any work)."""
    def look(fs: fsspec.AbstractFileSystem, path: str) -> bool:
        with _storage_errors(uri):
            fs.invalidate_cache(path)  # another writer may have changed it since we last listed
            return fs.exists(path)

    return _retrying(uri, options, look) if retried else look(*filesystem(uri, options))


def is_folder(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether `uri` is a folder (a prefix with objects below it, on object stores) rather
    than an object; StorageError when it is neither."""
    fs, path = filesystem(uri, options)
    with _storage_errors(uri):
        fs.invalidate_cache(path)
        return fs.info(path)["type"] == "directory"


def remove_tree(uri: str, options: StorageOptions | None = None) -> None:
    """Deletes `uri` and everything below it; nothing there is fine. Retries like read_bytes."""
    def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
        with _storage_errors(uri):
            fs.invalidate_cache()
            if fs.exists(path):
                # object stores expand a path as a glob: a[1]/x would delete a1/x, and miss a[1]/x
                fs.rm(path if is_local(uri) else _literal(path), recursive=True)

    _retrying(uri, options, remove)


def _literal(path: str) -> str:
    """A glob pattern that matches `path` only: its [, ], * and ? escaped."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def glob(pattern: str, options: StorageOptions | None = None, *, under: str) -> list[str]:
    """URIs (with the pattern's scheme) of the objects and folders matching a glob pattern.

    under: the start of `pattern` that is a folder taken as it is written, such as an output
        root whose name holds [, ] , * or ?: these are escaped, the rest of `pattern` is a glob.
    """
    if not pattern.startswith(under):
        raise ValueError(f"pattern {pattern!r} does not start with {under!r}")
    literal_length = len(filesystem(under, options)[1])  # the folder's part of the path, as fsspec has it
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""

    def find(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
        with _storage_errors(pattern):
            fs.invalidate_cache()
            return sorted(scheme + match for match in fs.glob(_literal(path[:literal_length]) + path[literal_length:]))

    return _retrying(pattern, options, find)


def move(source: str, destination: str, options: StorageOptions | None = None) -> None:
    """Moves one object (on object stores: a server-side copy, then a delete of the source)."""
    _, destination_path = filesystem(destination, options)

    def mv(fs: fsspec.AbstractFileSystem, source_path: str) -> None:
        with _storage_errors(source):
            if is_local(source):
                fs.mv(source_path, destination_path)  # a rename
            else:  # fsspec's mv expands the source as a glob: an output root named a[1] would not be found
                fs.cp_file(source_path, destination_path)
                fs.rm_file(source_path)

    _retrying(source, options, mv)


def join_uri(base: str, *parts: str) -> str:
    """`base/part1/part2...` with single slashes, for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent_uri(uri: str) -> str:
    """The folder that holds `uri` (absolute, without a trailing slash); a bucket's own root for
    the bucket (`s3://bucket`), which no folder holds."""
    scheme, sep, path = uri.rpartition("://")
    return f"{scheme}{sep}{posixpath.dirname(path) or path}"


def resolve_uri(uri: str, base_dir: str) -> str:
    """Resolve a manifest entry against the manifest's folder.

    URIs with a scheme (`s3://...`) and absolute local paths are returned unchanged; a local
    `file:///` URI is its path, its percent-escapes decoded as the standard has them (pathlib's
    `as_uri()` and Spark write `file:///a%20b.png` for `/a b.png`), so that one file has one name;
    relative paths (`img/a.jpg`, `../b.png`) are joined to `base_dir` and normalised.
    """
    if uri.startswith("file:///"):
        return unquote(uri.removeprefix("file://"))
    if "://" in uri or uri.startswith("/"):
        return uri
    scheme, sep, base_path = base_dir.rpartition("://")
    joined = posixpath.normpath(posixpath.join(base_path, uri))
    return f"{scheme}{sep}{joined}"


def as_given(error: StorageError, given: str, location: str) -> StorageError:
    """`error`, met at `location`, restated for `given`, the path as the manifest has it, with
    where a relative path led."""
    reason = error.reason if location == given else f"{error.reason} (at {location})"
    return type(error)(given, reason)


def redact_uri(text: str) -> str:
    """`text` with the `user:password@` part of any URL in it replaced by `***@`, and the values of
    query parameters that carry secrets (a presigned URL's signature, a token) by `***` (for logs,
    errors, records and reports). A URL with a port and an @ in its path loses more than its password."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def without_credentials(uri: str) -> str:
    """`uri` for a config: one that holds user:password@ or a secret in its query (a presigned URL)
    is a ValueError (its text redacted), as the config is kept in the run record."""
    for pattern, what in CREDENTIAL_RULES:
        if re.search(pattern, uri, re.IGNORECASE):
            raise ValueError(f"{redact_uri(uri)} holds {what}: {_CREDENTIALS_ELSEWHERE}")
    return uri


def redact_all(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with redact_uri applied to every string in it."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_all(item) for item in value]
    return value


@contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Turn whatever the filesystem raises into a StorageError naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        if e.__cause__ is not None and _is_connection_error(e.__cause__):
            # fsspec's HTTP filesystem on a host that does not answer: the row's error, not the job's (hosts differ per URI)
            raise StorageError(uri, f"cannot connect ({type(e.__cause__).__name__}: {e.__cause__})") from e
        detail = str(e) if "bucket" in str(e).lower() else ""  # s3fs says when the bucket, not the key, is missing
        raise StorageError(uri, f"not found ({detail})" if detail else "not found") from e
    except PermissionError as e:
        raise StorageError(uri, f"permission denied ({e}): check that the credentials in use may access it") from e
    except IsADirectoryError as e:
        raise StorageError(uri, "is a directory, not an object") from e
    except Exception as e:
        if type(e).__name__ == "NoCredentialsError":
            raise StorageError(uri, "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                    "AWS_PROFILE, or run where an instance or pod role applies") from e
        if _is_connection_error(e):
            # the next call in this process gets a new client, not the connections that just failed
            fsspec.get_filesystem_class(get_protocol(uri)).clear_instance_cache()
            raise StorageUnavailable(uri, f"endpoint unreachable ({type(e).__name__}: {e})") from e
        raise StorageError(uri, f"{type(e).__name__}: {e}") from e
