"""The listing step of a run on S3 (issue #23: 1,000,000 keys in <= 10 s): wall time and client CPU per key of
a2k's listing before (one listing, a dict and a manifest row per key), with obstore's Arrow pages only (one
listing), and now (`list_images`: Arrow pages, first-level prefixes listed at once), against moto's server in a
process of its own, directly and through a proxy that delays each request by --delay-ms (a user-space stand-in
for `tc netem`, which this VM's kernel lacks).

    python3 bench/s3_listing.py [--keys 100000] [--classes 100] [--delay-ms 0 20] [--repeat 2] [--paths ...]

moto answers a page in time that grows with the keys in its bucket (~1 ms a key at 100,000 keys on this VM), so
its server, not the client or the latency, bounds the wall time of a large listing here; `now1` (one folder at
a time) against `now` on a small bucket of many folders shows what listing the folders at once saves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.s3_reads import BUCKET, _free_port  # noqa: E402


def _moto_with_keys(port: int, n: int, classes: int) -> None:
    """moto's server on `port` holding `n` one-byte objects under list/<class>/ and a few the listing skips, put
    into its store directly (~80 us a key; through HTTP moto takes ~10 ms a key on this VM)."""
    from moto.backends import get_backend
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    s3 = get_backend("s3")["123456789012"]["global"]
    s3.create_bucket(BUCKET, "us-east-1")
    keys = [f"list/c{i % classes:04d}/img{i:07d}.jpg" for i in range(n)]
    for key in keys + ["list/c0000/notes.txt", "list/.hidden.jpg", "list/loose.png", "list/c0001/marker/"]:
        s3.put_object(BUCKET, key, b"" if key.endswith("/") else b"x")
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    while True:
        time.sleep(3600)


def start_moto(n: int, classes: int) -> tuple[multiprocessing.Process, str]:
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_moto_with_keys, args=(port, n, classes), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urlopen(url, timeout=1).close()
            break
        except OSError as e:
            if getattr(e, "code", None):  # an HTTP error answer: the server is up
                break
            if not server.is_alive():
                raise SystemExit("moto's server process ended before it served") from None
            time.sleep(0.5)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    return server, url


def _delay_proxy(port: int, upstream: tuple[str, int], delay: float) -> None:
    """Forward 127.0.0.1:`port` to `upstream`, each chunk of a request `delay` s late (pipelined, not serialized)."""

    async def pipe(reader, writer, late: float) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + late, data))
        queue.put_nowait(None)
        await sender

    async def handle(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        await asyncio.gather(pipe(reader, up_writer, delay), pipe(up_reader, writer, 0.0), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def before(source: str) -> int:
    """a2k's listing step before the Arrow columns: one listing, a dict per key, a manifest row per key."""
    import pyarrow as pa

    from tasks.images.listing import _add_object
    from tasks.images.manifest import MANIFEST_SCHEMA, sort_manifest
    from tasks.images.s3_reads import list_prefix
    from tasks.storage import filesystem

    fs, root = filesystem(source)
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    skipped: Counter[str] = Counter()
    for info in list_prefix(source):
        _add_object(rows, skipped, fs, root, info)
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)).num_rows


def arrow_one_listing(source: str) -> int:
    """Change 1 alone: obstore's Arrow pages of one listing, the manifest's columns by pyarrow compute."""
    import obstore
    import pyarrow as pa

    from tasks.images.listing import _object_columns
    from tasks.images.manifest import MANIFEST_SCHEMA, sort_manifest
    from tasks.images.s3_reads import LIST_PAGE, split_uri, store_for
    from tasks.storage import filesystem

    bucket, prefix = split_uri(source)
    stream = obstore.list(store_for(bucket), prefix, chunk_size=LIST_PAGE, return_arrow=True)
    table = pa.Table.from_batches([pa.record_batch(b) for b in stream])
    rows = _object_columns(table, filesystem(source)[1], Counter())
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)).num_rows


def now_one_at_a_time(source: str) -> int:
    """Changes 1 and 2 with one folder listed at a time: what listing the folders at once saves."""
    import pyarrow as pa

    from tasks.images.listing import _object_columns
    from tasks.images.manifest import MANIFEST_SCHEMA, sort_manifest
    from tasks.images.s3_reads import list_prefix_table
    from tasks.storage import filesystem

    rows = _object_columns(list_prefix_table(source, 1), filesystem(source)[1], Counter())
    return sort_manifest(pa.table(rows, schema=MANIFEST_SCHEMA)).num_rows


def now(source: str) -> int:
    """The listing step a run takes now: `list_images`."""
    from tasks.images.manifest import list_images

    return list_images(source).num_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--delay-ms", nargs="+", type=float, default=[0.0, 20.0])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=["before", "arrow1", "now"], help="of: before arrow1 now1 now")
    args = p.parse_args()
    paths = {"before": before, "arrow1": arrow_one_listing, "now1": now_one_at_a_time, "now": now}
    t = time.perf_counter()
    server, url = start_moto(args.keys, args.classes)
    print(f"{args.keys} keys in {args.classes} folders (and 4 others) on moto at {url} in {time.perf_counter() - t:.0f} s")
    now(f"s3://{BUCKET}/list/c0000")  # warm-up: imports, connections
    before(f"s3://{BUCKET}/list/c0000")
    proxies: list[multiprocessing.Process] = []
    try:
        for delay in args.delay_ms:
            endpoint = url
            if delay:
                port = _free_port()
                proxy = multiprocessing.get_context("spawn").Process(
                    target=_delay_proxy, args=(port, ("127.0.0.1", int(url.rsplit(":", 1)[1])), delay / 1e3),
                    daemon=True)
                proxy.start()
                proxies.append(proxy)
                time.sleep(1.0)
                endpoint = f"http://127.0.0.1:{port}"
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            for name in args.paths:
                for _ in range(args.repeat):
                    wall, cpu = time.perf_counter(), time.process_time()
                    got = paths[name](f"s3://{BUCKET}/list")
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    print(f"delay {delay:4.0f} ms  {name:7s} {got:8d} rows  {wall:7.2f} s  {got / wall:8.0f} keys/s  "
                          f"{cpu / max(got, 1) * 1e6:5.2f} us client CPU/key", flush=True)
    finally:
        for proxy in proxies:
            proxy.terminate()
        server.terminate()


if __name__ == "__main__":
    main()
