"""File operations a2k needs on any fsspec URL (a local folder or s3://...), with the atomicity each needs.

S3 endpoint and credentials come from the standard AWS environment and config files
(AWS_ENDPOINT_URL for MinIO, Ceph or R2); nothing here logs or stores them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import urllib.parse
import uuid
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def filesystem(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path within it (no trailing slash)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/") or "/"


def is_url(location: str | os.PathLike) -> bool:
    """True for `s3://bucket/key` and other fsspec URLs, False for a plain local path."""
    return "://" in str(location)


def object_paths(uris: list[str]) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem of `uris` (all in one store, as a manifest's are) and each one's path within it."""
    fs, _ = filesystem(uris[0])
    return fs, [fs._strip_protocol(u) for u in uris]


_CONNECTION_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                         "AWS_SESSION_TOKEN")


def redact(message: str) -> str:
    """`message` (e.g. a botocore error about to be logged or written to a table) without the endpoint or keys."""
    for name in _CONNECTION_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            message = message.replace(value.rstrip("/"), f"<{name}>")
    return message


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URL a user can pass back in (plain path for local files)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


class NoSpaceLeft(OSError):
    """A local write that found its device full, said in one line: the file, its size and the space free there."""

    said_in_one_line = True  # a2k.quiet: the CLI and the log show the line, not a traceback

    def __init__(self, path: str, size: int) -> None:
        folder = os.path.dirname(path) or "."
        try:
            free = f"{_size(shutil.disk_usage(folder).free)} free there"
        except OSError:
            free = "its free space unknown"
        super().__init__(errno.ENOSPC, f"no space left on the device of {folder!r} writing {os.path.basename(path)!r} "
                                       f"({_size(size)}; {free}): free at least {_size(size)} there (more for the "
                                       "rest of the run) and run the same command again")
        self.path, self.size = path, size

    def __str__(self) -> str:
        return self.strerror


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _write_new(tmp: str, data: bytes, target: str) -> None:
    """Write `data` to the local file `tmp`; on any failure the file is removed, and a full device is said as
    NoSpaceLeft naming `target` (the file the caller meant to write)."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if e.errno == errno.ENOSPC:
            raise NoSpaceLeft(target, len(data)) from None
        raise


class EndpointUnreachable(ConnectionError):
    """The configured S3 endpoint did not take a connection: said in one line, naming where it was configured
    (the endpoint itself is not written out, as `redact` keeps it out of logs)."""

    said_in_one_line = True  # a2k.quiet: the CLI and the log show the line, not a traceback


def check_reachable(fs: fsspec.AbstractFileSystem, timeout: float = 5.0) -> None:
    """For a store with a configured endpoint (AWS_ENDPOINT_URL for MinIO, Ceph, R2...), check that it takes a TCP
    connection; raise EndpointUnreachable if not. Without the check, s3fs reads a refused connection as a missing
    bucket or prefix. Local filesystems and AWS's own endpoints are not checked."""
    if is_local(fs):
        return
    sources = [("the filesystem's endpoint_url", getattr(fs, "endpoint_url", None)
                or getattr(fs, "client_kwargs", {}).get("endpoint_url"))]
    sources += [(name, os.environ.get(name)) for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")]
    source, endpoint = next(((n, v) for n, v in sources if v), (None, None))
    if endpoint is None:
        return
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise EndpointUnreachable(f"the S3 endpoint set in {source} could not be reached ({reason.lower()} at port "
                                  f"{port}); check that the store is running and the address is right") from None


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` holding `data` only if it does not exist yet; False if someone else created it first.

    Readers see the file whole or not at all. Local: written under a hidden temporary name, then hard-linked
    to `path`, which fails if `path` exists (O_EXCL alone would show other processes an empty file until the
    write ends; bench/NOTES.md, "Exclusive creates"). S3: a conditional PUT (If-None-Match: *), which
    S3, MinIO and moto honour. When the store carried out our PUT but its answer was lost (a 500 or a dropped
    connection), botocore's retry is refused as if someone else had created the object; it is ours if it holds
    our bytes, so callers put something unique in `data` (a stamp) where it matters who won.
    """
    fs.makedirs(fs._parent(path), exist_ok=True)
    if is_local(fs):
        return _link_new(fs, path, data)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return _holds(fs, path, data)
    return True


def _link_new(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    tmp = _temporary_name(fs, path)
    _write_new(tmp, data, path)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:  # no hard links on this filesystem (some FUSE and SMB mounts): O_EXCL in place
        log.warning("%s: no hard links here (%s); creating it in place, where a reader may see it empty for a "
                    "moment", path, e.strerror)
        try:
            with open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
    finally:
        os.remove(tmp)
    return True


def _temporary_name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A hidden name beside `path` that no other writer uses (listings skip it: readers look for their suffixes)."""
    return f"{fs._parent(path)}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"


def _holds(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    fs.invalidate_cache(path)
    try:
        return fs.size(path) == len(data) and fs.cat_file(path) == data
    except FileNotFoundError:
        return False


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` so readers see the old or the new content, never a part of it.

    Local: a hidden temporary file renamed over the target. S3: one PUT, which is atomic already.
    """
    fs.makedirs(fs._parent(path), exist_ok=True)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = _temporary_name(fs, path)
    _write_new(tmp, data, path)
    fs.mv(tmp, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def dumps(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n").encode()


def listdir_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Names directly under `path`, fresh from the store (s3fs caches listings), [] if it does not exist."""
    fs.invalidate_cache(path)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def sha256_of(f: BinaryIO) -> str:
    """The hex sha256 of an open binary file (from `open` or an fsspec filesystem), read from where it is to the end."""
    return hashlib.file_digest(f, "sha256").hexdigest()


def read_parquet(url: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file at any URL, read through its filesystem (after dropping s3fs's cached listing of it)."""
    fs, path = filesystem(url)
    return read_parquet_at(fs, path, columns)


def read_parquet_at(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """`read_parquet` for a path of a filesystem already resolved."""
    fs.invalidate_cache(path)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_parquet(table: pa.Table, url: str | os.PathLike, **options: Any) -> str:
    """Write `table` as one Parquet file with `write_atomic` (one complete PUT on S3); returns its URL."""
    fs, path = filesystem(url)
    return write_parquet_at(table, fs, path, **options)


def write_parquet_at(table: pa.Table, fs: fsspec.AbstractFileSystem, path: str, **options: Any) -> str:
    """`write_parquet` to a path of a filesystem already resolved; returns its URL."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **options)
    write_atomic(fs, path, buf.getvalue().to_pybytes())
    return full_url(fs, path)
