"""The read + header-check stage on files not in the page cache, as a nightly job over millions of images meets
them (the other benchmarks read files hard-linked from 500 photos, which stay cached): reader threads against
reader processes.

    python3 bench/cold_reads.py --source DIR [--batch-size 256] [--threads 1 4] [--processes 2 4] [--repeat 3]

Each file is dropped from the page cache (`posix_fadvise(DONTNEED)`, no root needed) before every timed pass;
"cached" passes read the same files again without dropping them. Files must be distinct (not hard links of one
another: a link shares its inode's cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.images.read import ReadArena, load_blobs  # noqa: E402
from tasks.images.read_procs import MIN_SLOT_BYTES, SLOT_BYTES_PER_IMAGE, ProcessReaders  # noqa: E402


def drop_from_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="*", default=[1, 4])
    p.add_argument("--processes", type=int, nargs="*", default=[2, 4])
    p.add_argument("--threads-per-process", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    files = sorted(str(f) for f in args.source.rglob("*") if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg"))
    if len({os.stat(f).st_ino for f in files}) != len(files):
        p.error(f"{args.source} holds hard links of one file: their cache is shared, so they cannot be read cold")
    batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    mb = sum(os.path.getsize(f) for f in files) / 1e6

    readers: dict[str, object] = {}
    for n in args.threads:
        pool, arena = ThreadPoolExecutor(n), ReadArena()
        readers[f"{n} reader thread{'s' if n > 1 else ''}"] = lambda b, _k, pool=pool, arena=arena: \
            load_blobs(b, pool, arena=arena)
    for n in args.processes:
        for t in args.threads_per_process:
            procs = ProcessReaders(n, slots=2, slot_bytes=max(MIN_SLOT_BYTES, args.batch_size * SLOT_BYTES_PER_IMAGE),
                                   threads=t)
            readers[f"{n} reader processes x {t} threads"] = lambda b, k, procs=procs: procs.load(b, k % 2)

    print(f"{len(files)} files, {mb:.1f} MB, batches of {args.batch_size}; median of {args.repeat} passes; "
          f"{os.cpu_count()} cores")
    print("| readers | cold images/s | cached images/s |\n|---|---|---|")
    for name, load in readers.items():
        load(batches[0], 0)  # start-up (process pools, arenas) out of the timing
        rates = {}
        for cold in (True, False):
            times = []
            for _ in range(args.repeat):
                if cold:
                    drop_from_cache(files)
                t0 = time.perf_counter()
                for k, batch in enumerate(batches):
                    blobs = load(batch, k)
                    assert len(blobs) == len(batch)
                times.append(time.perf_counter() - t0)
            rates[cold] = len(files) / statistics.median(times)
        print(f"| {name} | {rates[True]:,.0f} | {rates[False]:,.0f} |")


if __name__ == "__main__":
    main()
