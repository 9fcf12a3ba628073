"""Shards through one ShardClassifier from two threads, as the in-process runner gives them, without Prefect: the
images/s of the classify pipeline alone (reads, DALI, model, Arrow rows), and a process to profile, e.g.

    py-spy record --gil --threads --rate 200 --format raw -o gil.txt -- \
        python3 bench/shard_runs.py --source ../shared/data/imagenet-sample --files 40960

(`--gil` keeps only the samples of the thread holding the GIL: which stage keeps the others waiting.)
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402,F401  (its CUDA settings, before CUDA starts)


def _cpu_times() -> tuple[float, float, dict[str, float]]:
    """The machine's busy and total CPU seconds (all cores, from /proc/stat), and the CPU seconds of this process's
    threads by name (Python's name where it has one; digits dropped, so that DALI's workers add up) and of its
    descendant processes (the reader processes, under "reader processes"). Linux only."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    total, idle = sum(fields[:8]), fields[3] + fields[4]  # idle + iowait
    python_names = {t.native_id: t.name for t in threading.enumerate()}  # the OS knows Python's threads as "python"
    by_name: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = python_names.get(int(tid)) or f.read().strip()
            name = re.sub(r"[\d_-]+$", "", name) or "?"
            by_name[name] = by_name.get(name, 0.0) + _stat_seconds(f"/proc/self/task/{tid}/stat", tick)
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= more
        grew = bool(more)
    children = 0.0
    for pid in mine - {os.getpid()}:
        try:
            children += _stat_seconds(f"/proc/{pid}/stat", tick)
        except (FileNotFoundError, ProcessLookupError):
            continue
    by_name["reader processes"] = children
    return (total - idle) / tick, total / tick, by_name


def _stat_seconds(path: str, tick: int) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime, stime


def _cpu_report(before: tuple[float, float, dict[str, float]], wall: float) -> str:
    busy0, total0, threads0 = before
    busy1, total1, threads1 = _cpu_times()
    cores = os.cpu_count() or 1
    used = {name: seconds - threads0.get(name, 0.0) for name, seconds in threads1.items()}
    top = sorted(((s, n) for n, s in used.items() if s >= 0.05), reverse=True)
    return (f"CPU: {cores * (busy1 - busy0) / (total1 - total0):.1f} of {cores} cores busy over {wall:.2f} s; "
            "CPU seconds: " + ", ".join(f"{n} {s:.2f}" for s, n in top))


def main(argv: list[str] | None = None) -> None:
    from bench.run_all import model_dir_for, replicate
    from tasks.classify.plan import RunContext
    from tasks.classify.shard import ShardClassifier
    from tasks.images.manifest import list_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True, help="folder of images to replicate")
    p.add_argument("--files", type=int, default=40_960)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--model", default="resnet50", help="architecture (random weights) or model directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None, help="DALI threads (default: a2k's)")
    p.add_argument("--read-processes", type=int, default=None, help="0 reads in a thread (default: a2k's)")
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--compile", default=None, help="torch.compile mode for the model (CUDA), e.g. max-autotune-no-cudagraphs")
    p.add_argument("--stream-depth", type=int, default=None, help="batches in DALI at once (default: a2k's)")
    p.add_argument("--model-off", action="store_true",
                   help="skip the forward pass (rows get class 0): the pipeline's rate without the model on the card")
    p.add_argument("--blocking-sync", action="store_true",
                   help="CUDA events made blocking (cudaEventBlockingSync): the model's thread sleeps while it waits "
                        "for a batch's top k instead of spinning a core beside DALI's threads")
    p.add_argument("--cpu-report", action="store_true",
                   help="after each pass, how many cores were busy and the CPU seconds of each kind of thread")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/a2k-shard-runs"))
    args = p.parse_args(argv)

    images = args.workdir / f"images-{args.files}"
    if not images.exists():
        replicate(args.source, images, args.files, link=True)
    _, model_dir = model_dir_for(args.model, args.workdir)
    if args.stream_depth:
        import tasks.classify.shard
        from tasks.images.decode import ImageDecoder

        ImageDecoder.decode_stream.__defaults__ = (args.stream_depth,)
        tasks.classify.shard.ARENAS = tasks.classify.shard.READ_AHEAD + args.stream_depth + 1
    if args.compile:
        import tasks.classify.shard

        tasks.classify.shard.Classifier = functools.partial(tasks.classify.shard.Classifier, compile_mode=args.compile)
    if args.blocking_sync:  # every event the run creates, the model's wait for its top k included
        import torch

        torch.cuda.Event = functools.partial(torch.cuda.Event, blocking=True)
    worker = ShardClassifier(model_dir, args.device, args.batch_size, args.num_threads, args.hw_decoder_load,
                             read_processes=args.read_processes)
    if args.model_off:
        import numpy as np

        def no_model(images, k):
            return np.zeros((len(images), k), np.float32), np.zeros((len(images), k), np.int64)

        worker.classifier.top_k = no_model
    table = list_images(images)
    uris, labels = table.column("uri").to_pylist(), table.column("label").to_pylist()
    shards = [(uris[i:i + args.shard_size], labels[i:i + args.shard_size]) for i in range(0, len(uris), args.shard_size)]
    ctx = RunContext("bench", "1", "-", "shard-runs", top_k=5)
    worker.run(*shards[0], ctx)  # warm-up: DALI's pools, cuDNN, the reader processes
    for _ in range(args.repeat):
        cpu = _cpu_times() if args.cpu_report else None
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2, thread_name_prefix="shard") as pool:
            outs = list(pool.map(lambda s: worker.run(*s, ctx), shards))
            wall = time.perf_counter() - t0
            if cpu is not None:  # while the shard threads are alive: an ended thread's CPU time is not listed
                print(_cpu_report(cpu, wall), flush=True)
        print(f"{len(uris) / wall:.0f} images/s on {worker.device} ({args.num_threads or 'default'} "
              f"DALI threads, hw load {args.hw_decoder_load}, compile {args.compile}"
              f"{', blocking CUDA events' if args.blocking_sync else ''}, stream depth "
              f"{args.stream_depth or 'default'}, model "
              f"{'off' if args.model_off else 'on'}, local files read by {worker.reading}); a shard: {outs[len(outs) // 2][2].describe()}",
              flush=True)


if __name__ == "__main__":
    main()
