"""Reads and listings of s3:// objects through obstore, a Rust client: many GETs in flight on one event loop for a
fraction of the CPU s3fs spends per object (bench/NOTES.md, 'Issue #23'). s3fs stays a2k's
interface for everything else on S3 (outputs, conditional creates, the registry, manifests): few requests each.

Connection settings are the standard AWS ones: credentials from botocore's chain (environment, ~/.aws files,
profiles, container and instance roles), region likewise, AWS_ENDPOINT_URL(_S3) for MinIO, Ceph or R2, and
AWS_MAX_ATTEMPTS for the number of attempts. Nothing here logs or stores them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import botocore.session
import obstore
import pyarrow as pa
from obstore.exceptions import GenericError, InvalidPathError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from tasks.storage import filesystem

log = logging.getLogger(__name__)

# GETs in flight per process: a local server answered ~650 objects/s at 128 (bench/NOTES.md); an S3 prefix
# takes thousands per second, and each request waits mostly on the network
IN_FLIGHT = 64
DEFAULT_ATTEMPTS = 5  # botocore's legacy mode, which s3fs uses unless AWS_MAX_ATTEMPTS says otherwise
_WHOLE = 1 << 50  # the end of a range that takes a whole object: a store answers a range past the end with all of it
# ... with 206 as AWS does; some S3-compatible servers (rclone's `serve s3`) answer 200 and the whole object, which
# obstore refuses with this message: such a bucket's objects are read with plain GETs (for the process's life)
_NON_PARTIAL = "non-partial response when range requested"
_WHOLE_GETS: set[str] = set()
LIST_PAGE = 1000  # keys per ListObjectsV2 page: S3's largest
# first-level prefixes listed at once: each page waits a round trip, so one listing after another of a prefix of
# 1,000,000 keys at 20 ms a page waits >= 20 s (issue #23)
LISTINGS_AT_ONCE = 32
# what decides the store a process builds; a store is kept per bucket and settings, so a test (or a user) that
# changes them gets a new one
_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def connection_settings() -> tuple[tuple[str, str], ...]:
    """The AWS variables of this process that decide how objects are reached (to hand to a reader process)."""
    return tuple((name, os.environ[name]) for name in _SETTINGS if name in os.environ)


def use_settings(settings: tuple[tuple[str, str], ...]) -> None:
    """Make `settings` (another process's `connection_settings`) this process's AWS variables: in a reader process,
    whose environment is its forkserver's, copied when that started."""
    given = dict(settings)
    for name in _SETTINGS:
        if name in given:
            os.environ[name] = given[name]
        else:
            os.environ.pop(name, None)


def split_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of 's3://bucket/key'."""
    bucket, _, key = uri.partition("://")[2].partition("/")
    return bucket, key


def store_for(bucket: str) -> S3Store:
    """This process's client for `bucket` under its current AWS settings (kept: its connections are reused)."""
    return _store(bucket, connection_settings())


@functools.lru_cache(maxsize=16)
def _store(bucket: str, settings: tuple[tuple[str, str], ...]) -> S3Store:
    env = dict(settings)
    session = botocore.session.Session()
    config: dict[str, Any] = {"region": session.get_config_variable("region") or "us-east-1"}
    client: dict[str, Any] = {}
    if endpoint := env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    attempts = _attempts(env.get("AWS_MAX_ATTEMPTS"))
    # obstore retries 5xx answers (S3's throttling is 503 SlowDown), dropped connections and timeouts; never a 4xx
    retry = {"max_retries": attempts - 1, "retry_timeout": timedelta(minutes=3),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=20), "base": 2}}
    credentials = session.get_credentials()
    provider = _BotocoreCredentials(credentials) if credentials is not None else None
    return S3Store(bucket, config=config, client_options=client, retry_config=retry, credential_provider=provider)


def _attempts(value: str | None) -> int:
    if value is None:
        return DEFAULT_ATTEMPTS
    try:
        attempts = int(value)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS {value!r} must be a whole number of at least 1")
    return attempts


class _BotocoreCredentials:
    """botocore's credentials (its whole chain, refreshed as botocore refreshes them) for obstore, which asks
    again after `TTL`."""

    TTL = timedelta(minutes=5)

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self._credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + self.TTL}


def fetch_objects(uris: list[str], in_flight: int = IN_FLIGHT) -> list[memoryview | BaseException]:
    """The bytes of each object (a view of obstore's buffer: no copy), or the error that ended its GET after
    obstore's retries; order follows `uris`. Runs its own event loop: call it from a thread that has none."""
    return asyncio.run(_fetch_all(uris, in_flight))


async def _fetch_all(uris: list[str], in_flight: int) -> list[memoryview | BaseException]:
    slots = asyncio.Semaphore(in_flight)
    stores: dict[str, S3Store] = {}

    async def fetch(uri: str) -> memoryview | BaseException:
        bucket, key = split_uri(uri)
        store = stores.get(bucket) or stores.setdefault(bucket, store_for(bucket))
        async with slots:
            try:
                if bucket not in _WHOLE_GETS:
                    try:  # one call into obstore rather than two (GET, then its body): ~20% less CPU per object
                        return memoryview(await obstore.get_range_async(store, key, start=0, end=_WHOLE))
                    except GenericError as e:
                        if _NON_PARTIAL in str(e):  # this server ignores a range past the end: plain GETs from now on
                            _WHOLE_GETS.add(bucket)
                        elif "416" not in str(e):
                            raise
                # an empty object refuses every range (416), and some servers answer such a range with 200 and
                # the whole object, which obstore refuses: asked for whole
                return memoryview(await (await obstore.get_async(store, key)).bytes_async())
            except Exception as e:  # noqa: BLE001 - one object's failure; the caller makes it that object's row
                return e

    return await asyncio.gather(*(fetch(u) for u in uris))


def is_permission_error(error: BaseException) -> bool:
    return isinstance(error, (PermissionError, PermissionDeniedError, UnauthenticatedError))


def is_unnamed_key(error: BaseException) -> bool:
    """True for obstore's refusal of a key its paths cannot hold (an empty segment as in 'a//b', or '.' or '..'):
    such an object is read through s3fs instead."""
    return isinstance(error, (ValueError, InvalidPathError)) and "path" in str(error).lower()


def describe(error: BaseException) -> str:
    """obstore's message without the debug dump it appends (several lines of the request's internals)."""
    return " ".join(str(error).split("\n\nDebug source:", 1)[0].split())


def list_prefix(source: str) -> Iterator[dict[str, Any]]:
    """Every object under the prefix `source` (s3://bucket/prefix), in pages of up to `LIST_PAGE` keys: each
    as {'path': 'bucket/key', 'size', 'LastModified', 'ETag'} (s3fs's names, which the manifest reads)."""
    bucket, prefix = split_uri(source.rstrip("/"))
    store = store_for(bucket)
    last = ""
    try:
        for page in obstore.list(store, prefix or None, chunk_size=LIST_PAGE):
            for meta in page:
                last = f"{bucket}/{meta['path']}"
                yield {"path": _marked(last, meta["size"]), "size": meta["size"],
                       "LastModified": meta["last_modified"], "ETag": meta["e_tag"]}
    except GenericError as e:
        if "<Code>NoSuchBucket</Code>" in str(e):
            raise FileNotFoundError(f"no bucket {bucket!r}") from None
        raise
    except InvalidPathError as e:  # a key obstore cannot name ('a//b.jpg'): the rest of the listing through s3fs
        log.warning("listing the rest of %s through s3fs: %s", source, describe(e).split(":", 1)[0])
        yield from _list_through_s3fs(source, after=last)


def list_prefix_table(source: str, at_once: int = LISTINGS_AT_ONCE) -> pa.Table | None:
    """Every object under the prefix `source` as obstore's Arrow columns (path: the key without its bucket, size,
    last_modified, e_tag; no Python object per key), or None when a key obstore cannot name is under it (the
    caller then takes `list_prefix`). One delimited listing names the first-level prefixes and the objects
    beside them; the prefixes are then listed `at_once` at a time, so their pages' round trips overlap."""
    bucket, prefix = split_uri(source.rstrip("/"))
    store = store_for(bucket)
    try:
        tables = _run(_list_tree(store, prefix or None, at_once))
    except GenericError as e:
        if "<Code>NoSuchBucket</Code>" in str(e):
            raise FileNotFoundError(f"no bucket {bucket!r}") from None
        raise
    except InvalidPathError as e:
        log.warning("listing %s key by key: %s", source, describe(e).split(":", 1)[0])
        return None
    columns = ["path", "size", "last_modified", "e_tag"]
    return pa.concat_tables([t.select(columns) for t in tables])


async def _list_tree(store: S3Store, prefix: str | None, at_once: int) -> list[pa.Table]:
    attempts = _attempts(os.environ.get("AWS_MAX_ATTEMPTS"))
    top = await _again(lambda: obstore.list_with_delimiter_async(store, prefix, return_arrow=True), attempts)
    first = pa.table(top["objects"])
    slots = asyncio.Semaphore(at_once)

    async def under(sub: str) -> pa.Table:
        async def listing() -> list[pa.RecordBatch]:
            stream = obstore.list(store, sub, chunk_size=LIST_PAGE, return_arrow=True)
            return [pa.record_batch(batch) async for batch in stream]

        async with slots:
            batches = await _again(listing, attempts)
        return pa.Table.from_batches(batches, first.schema) if batches else first.schema.empty_table()

    return [first, *await asyncio.gather(*(under(sub) for sub in top["common_prefixes"]))]


async def _again(call: Callable[[], Awaitable[Any]], attempts: int) -> Any:
    """`call()`, made again (after 0.1, 0.2, 0.4 ... s) when it fails in a way a repeat can cure: obstore retries a
    request that fails, not a listing page whose body breaks off (a connection reset mid-page); a listing is
    idempotent, so it is listed again whole. A missing bucket or a refusal (4xx) is not retried."""
    for attempt in range(attempts):
        try:
            return await call()
        except GenericError as e:
            text = str(e)
            if attempt + 1 >= attempts or "<Code>" in text and "<Code>SlowDown</Code>" not in text \
                    and "<Code>InternalError</Code>" not in text and "<Code>ServiceUnavailable</Code>" not in text:
                raise
            log.info("listing again after a transient error (%d of %d): %s", attempt + 2, attempts,
                     describe(e)[:200])
            await asyncio.sleep(0.1 * 2 ** attempt)


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run`, in a thread of its own when this one already runs an event loop (a caller's async code)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _marked(path: str, size: int) -> str:
    """obstore lists a folder marker (an empty key ending in '/', as S3 consoles make them) without its '/'; an
    empty object whose name has no suffix is taken for one again (it is no image either way)."""
    return f"{path}/" if size == 0 and "." not in path.rsplit("/", 1)[-1] else path


def _list_through_s3fs(source: str, after: str) -> Iterator[dict[str, Any]]:
    """`list_prefix`'s objects whose path sorts after `after` (S3 lists keys in that order), through s3fs."""
    fs, root = filesystem(source)
    fs.invalidate_cache(root)
    for path, info in fs.find(root, detail=True).items():
        if info.get("type") == "file" and path > after:
            yield {"path": path, "size": info["size"], "LastModified": info.get("LastModified"),
                   "ETag": info.get("ETag")}


def head_object(uri: str) -> dict[str, Any] | None:
    """The object's metadata, or None when there is no object at `uri`."""
    bucket, key = split_uri(uri)
    try:
        return obstore.head(store_for(bucket), key)
    except FileNotFoundError:
        return None
