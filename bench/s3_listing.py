"""The listing step of a run on S3 (issue #23: 1,000,000 keys in <= 10 s): wall time and client CPU per key of
a2k's listing before (one listing, a dict and a manifest row per key), with obstore's Arrow pages only (one
listing), and now (`list_images`: Arrow pages, first-level prefixes listed at once), against moto's server in a
process of its own (or rclone's `serve s3` over files, --server rclone), directly and through a proxy that delays
each request by --delay-ms (bench/delay_proxy.py: a user-space stand-in for `tc netem`, which this VM's kernel lacks).

    python3 bench/s3_listing.py [--keys 100000] [--classes 100] [--delay-ms 0 20] [--repeat 2] [--paths ...]

moto answers a page in time that grows with the keys in its bucket (~1 ms a key at 100,000 keys on this VM), so
its server, not the client or the latency, bounds the wall time of a large listing here; `now1` (one folder at
a time) against `now` on a small bucket of many folders shows what listing the folders at once saves.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import delay_proxy  # noqa: E402
from bench.s3_reads import BUCKET, _free_port, rclone_command, wait_for_port  # noqa: E402


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
    wait_for_port(port, "moto's server process", server.is_alive, seconds=3600)  # it fills its store first
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    return server, url


def start_rclone(n: int, classes: int, root: Path) -> tuple[subprocess.Popen, str]:
    """`rclone serve s3` over `root`, whose folder BUCKET holds `n` one-byte files under list/<class>/ and the
    same few the listing skips as with moto: a server that lists a large bucket without slowing per key."""
    keys = [f"list/c{i % classes:04d}/img{i:07d}.jpg" for i in range(n)]
    keys += ["list/c0000/notes.txt", "list/.hidden.jpg", "list/loose.png"]
    for folder in {k.rpartition("/")[0] for k in keys}:
        (root / BUCKET / folder).mkdir(parents=True, exist_ok=True)
    for key in keys:
        fd = os.open(root / BUCKET / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x")
        os.close(fd)
    port = _free_port()
    server = subprocess.Popen(rclone_command(str(root), port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_port(port, "rclone", lambda: server.poll() is None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=url)
    return server, url


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
    p.add_argument("--server", choices=["moto", "rclone"], default="moto",
                   help="moto (keys in its memory) or rclone's `serve s3` over files on disk (rclone on PATH)")
    p.add_argument("--workdir", type=Path, default=None, help="where rclone's files go (default: a temporary folder)")
    args = p.parse_args()
    paths = {"before": before, "arrow1": arrow_one_listing, "now1": now_one_at_a_time, "now": now}
    t = time.perf_counter()
    if args.server == "rclone":
        root = Path(tempfile.mkdtemp(prefix="a2k-list-", dir=args.workdir))
        server, url = start_rclone(args.keys, args.classes, root)
        stop = server.terminate
    else:
        server, url = start_moto(args.keys, args.classes)
        stop = server.terminate
    print(f"{args.keys} keys in {args.classes} folders (and a few others) on {args.server} at {url} in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    now(f"s3://{BUCKET}/list/c0000")  # warm-up: imports, connections
    before(f"s3://{BUCKET}/list/c0000")
    proxies: list[multiprocessing.Process] = []
    try:
        for delay in args.delay_ms:
            endpoint = url
            if delay:
                port, procs = delay_proxy.start(int(url.rsplit(":", 1)[1]), delay / 1e3)
                proxies += procs
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
        stop()
        if args.server == "rclone":
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
