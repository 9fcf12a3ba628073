"""Time each stage of one classify batch separately (read + check, DALI decode, model top-k), each with the
variants compared in bench/NOTES.md, then a whole shard through ShardClassifier.run with the stages overlapped.

    python3 bench/profile_stages.py --source DIR [--arch resnet50] [--batch-size 256] [--hw-decoder-load 0.65]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def beside(main_fn, side_fn) -> tuple[float, float]:
    """Seconds `main_fn()` took while `side_fn()` ran in a loop on another thread, and seconds a `side_fn()` call
    took meanwhile (its calls that ended during `main_fn`, averaged): how much two stages slow each other when
    they run at once with no data passing between them (sharing the GPU and the GIL, as in a shard run)."""
    done, ends = threading.Event(), []

    def loop() -> None:
        while not done.is_set():
            side_fn()
            ends.append(time.perf_counter())

    side = threading.Thread(target=loop)
    side.start()
    time.sleep(0.5)  # the side loop warmed up and running
    t0 = time.perf_counter()
    main_fn()
    t1 = time.perf_counter()
    done.set()
    side.join()
    during = [t for t in ends if t0 <= t <= t1]
    return t1 - t0, (during[-1] - during[0]) / (len(during) - 1) if len(during) > 1 else float("nan")


def gpu_timeline(fn, trace_path: Path) -> list[str]:
    """Run `fn()` under the PyTorch profiler (CUPTI sees every kernel of the process, DALI's and nvJPEG's too),
    write the Chrome trace (gzipped) to `trace_path`, and summarize it: how much of the span the GPU was busy,
    how much of it two streams' kernels overlapped, and each stream's kernels."""
    import gzip
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    raw = trace_path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    events = json.loads(raw.read_text())["traceEvents"]
    with gzip.open(trace_path, "wt") as f:
        json.dump(events, f)
    raw.unlink()
    return summarize_timeline(events)


def summarize_timeline(events: list[dict]) -> list[str]:
    work = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not work:
        return ["no GPU activity recorded"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in work if e["cat"] == "kernel")
    busy = overlap = 0.0
    end = spans[0][0]
    for a, b in spans:  # union of kernel time, and time under two or more kernels at once
        busy += max(0.0, b - max(a, end))
        overlap += max(0.0, min(b, end) - a)
        end = max(end, b)
    span = max(e["ts"] + e["dur"] for e in work) - min(e["ts"] for e in work)
    lines = [f"span {span / 1e3:.1f} ms: kernels busy {busy / 1e3:.1f} ms ({busy / span:.0%}), under two or more "
             f"kernels at once {overlap / 1e3:.1f} ms"]
    calls: dict = {}  # host-side CUDA calls by name and thread: a synchronization shows up as a long one
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            n, total = calls.get((e["name"], e.get("tid")), (0, 0.0))
            calls[(e["name"], e.get("tid"))] = (n + 1, total + e["dur"])
    for (name, tid), (n, total) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]:
        lines.append(f"host call {name} on thread {tid}: {n} calls, {total / 1e3:.1f} ms")
    streams: dict = {}
    for e in work:
        key = (e.get("args", {}).get("stream"), e["cat"])
        n, total, names = streams.get(key, (0, 0.0, {}))
        names[e["name"][:60]] = names.get(e["name"][:60], 0.0) + e["dur"]
        streams[key] = (n + 1, total + e["dur"], names)
    for (stream, cat), (n, total, names) in sorted(streams.items(), key=lambda kv: -kv[1][1]):
        top = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"stream {stream} {cat}: {n} ops, {total / 1e3:.1f} ms; most: {top}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--readers", type=int, nargs="+", default=[1, 16], help="reader thread counts to compare")
    p.add_argument("--dali-threads", type=int, nargs="+", default=[8, 16], help="DALI thread counts to compare")
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--shard-batches", type=int, default=16, help="batches in the timed ShardClassifier.run")
    p.add_argument("--shard-readers", type=int, nargs="*", default=[1, 2], help="reader threads to run the shard with")
    p.add_argument("--stream-depths", type=int, nargs="+", default=[2, 3], help="decode_stream depths to compare")
    p.add_argument("--model-sms", type=int, nargs="*", default=[], help="also run the model beside the decode "
                   "stream on a green context of this many SMs (torch.cuda.green_contexts), each count in turn")
    p.add_argument("--trace-dir", type=Path, help="write GPU timelines of the decode stream alone, beside the "
                   "model, and of a shard run there (Chrome traces, gzipped) and print their summaries")
    args = p.parse_args()

    import tempfile

    from bench.run_all import model_dir_for
    from tasks.classify.plan import RunContext
    from tasks.classify.shard import ShardClassifier
    from tasks.images.decode import ImageDecoder
    from tasks.images.read import ReadArena, check_header, load_blobs

    files = sorted(str(f) for f in args.source.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg"))
    uris = (files * (args.batch_size // len(files) + 1))[: args.batch_size]
    _, model_dir = model_dir_for(args.arch, Path(tempfile.mkdtemp()))
    worker = ShardClassifier(str(model_dir), args.device, args.batch_size, None, args.hw_decoder_load)
    n = len(uris)
    rows = {}
    timelines: dict[str, list[str]] = {}
    for count in args.readers:
        with ThreadPoolExecutor(count) as readers:
            rows[f"read + check, a bytes object a file ({count} threads)"] = timed(
                lambda: load_blobs(uris, readers), args.repeat)
            arena = ReadArena()
            rows[f"read + check, into a ReadArena ({count} threads)"] = timed(
                lambda: load_blobs(uris, readers, arena=arena), args.repeat)
    with ThreadPoolExecutor(16) as readers:
        blobs = load_blobs(uris, readers)
    data = [b.data for b in blobs]
    rows["header check only (1 thread)"] = timed(lambda: [check_header(b) for b in data], args.repeat)
    pre, dev = worker.classifier.entry.preprocessing, worker.device
    for threads in args.dali_threads:
        decoder = ImageDecoder(pre, dev, n, threads, hw_decoder_load=args.hw_decoder_load)
        what = f"({dev}, hw_decoder_load {args.hw_decoder_load}, {threads} threads)"
        rows[f"DALI decode+resize+crop+normalize, a batch at a time {what}"] = \
            timed(lambda: decoder.decode(blobs), args.repeat)
        for depth in args.stream_depths:  # per batch, over a stream of args.shard_batches batches
            rows[f"DALI decode, streamed {depth} batches deep {what}"] = timed(
                lambda: list(decoder.decode_stream([blobs] * args.shard_batches, depth)), 1) / args.shard_batches
        del decoder
    images = worker.decoder.decode(blobs).images
    graph, worker.classifier.graph = worker.classifier.graph, None
    rows["model top-k incl. copy to host, eager"] = timed(lambda: worker.classifier.top_k(images, 5), args.repeat)
    if graph is not None:
        worker.classifier.graph = graph
        rows["model top-k incl. copy to host, CUDA graph"] = timed(lambda: worker.classifier.top_k(images, 5), args.repeat)
    if worker.decode_stream is not None:  # as in a shard run: decode on its stream and thread, the model beside it
        import torch

        from tasks.images.decode import STREAM_DEPTH

        def decode_shard() -> None:
            with torch.cuda.stream(worker.decode_stream):
                list(worker.decoder.decode_stream([blobs] * args.shard_batches, STREAM_DEPTH))
            torch.cuda.synchronize()

        def model_step() -> None:
            worker.classifier.top_k(images, 5)

        def model_step_on(stream):
            def step() -> None:
                with torch.cuda.stream(stream):
                    model_step()
            return step

        rows[f"DALI decode streamed alone (shard's decoder, depth {STREAM_DEPTH})"] = \
            timed(decode_shard, 1) / args.shard_batches
        sec, model_sec = beside(decode_shard, model_step)
        rows["DALI decode streamed, the model looping beside it"] = sec / args.shard_batches
        rows["model top-k, while the decode stream runs beside it"] = model_sec
        sec, model_sec = beside(decode_shard, model_step_on(torch.cuda.Stream()))
        rows["DALI decode streamed, the model looping beside it on a stream of its own"] = sec / args.shard_batches
        rows["model top-k on a stream of its own, while the decode stream runs beside it"] = model_sec
        for sms in args.model_sms:  # the model kept off some SMs, which are then always free for DALI's kernels
            from torch.cuda.green_contexts import GreenContext

            try:
                green_ctx = GreenContext.create(num_sms=sms)  # kept: the stream dies with it
                model_on_green = model_step_on(green_ctx.Stream())
            except (RuntimeError, TypeError) as e:  # driver or cuda.bindings too old, or a count the card cannot split
                rows[f"model on {sms} SMs: no green context ({e})"] = float("nan")
                continue

            rows[f"model top-k on {sms} SMs (green context), alone"] = timed(model_on_green, args.repeat)
            sec, model_sec = beside(decode_shard, model_on_green)
            rows[f"DALI decode streamed, the model on {sms} SMs beside it"] = sec / args.shard_batches
            rows[f"model top-k on {sms} SMs, while the decode stream runs beside it"] = model_sec
            if args.trace_dir and sms == args.model_sms[-1]:
                args.trace_dir.mkdir(parents=True, exist_ok=True)
                path = args.trace_dir / f"decode-beside-model-{sms}-sms.json.gz"
                beside(lambda: timelines.update(
                    {f"decode stream, the model on {sms} SMs beside it": gpu_timeline(decode_shard, path)}),
                    model_on_green)
        if args.trace_dir:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
            timelines["decode stream alone"] = gpu_timeline(decode_shard, args.trace_dir / "decode-alone.json.gz")
            path = args.trace_dir / "decode-beside-model.json.gz"  # traced once the model's loop is running
            beside(lambda: timelines.update({"decode stream, the model beside it": gpu_timeline(decode_shard, path)}),
                   model_step)
    ctx = RunContext("m", "1", "x" * 64, "run", 5)
    shard = (files * (args.shard_batches * n // len(files) + 1))[: args.shard_batches * n]
    if args.trace_dir and worker.decode_stream is not None:
        timelines["a shard run"] = gpu_timeline(lambda: worker.run(shard, [None] * len(shard), ctx),
                                                args.trace_dir / "shard.json.gz")
    what = f"ShardClassifier.run over {len(shard)} images (stages overlapped)"
    waits = {}

    def shard_run(label: str) -> None:
        runs = [worker.run(shard, [None] * len(shard), ctx)[2] for _ in range(1 + max(1, args.repeat // 4))][1:]
        best = min(runs, key=lambda t: t.seconds)
        rows[label] = best.seconds * n / len(shard)
        waits[label] = best.describe()

    if worker.process_readers is not None:
        shard_run(f"{what}, {worker.process_readers.workers} reader processes")
    worker.process_readers = None
    for count in args.shard_readers:
        worker.readers.shutdown()
        worker.readers = ThreadPoolExecutor(count, thread_name_prefix="a2k-read")
        shard_run(f"{what}, {count} reader threads")
    print(f"batch of {n} images, {args.arch}, median of {args.repeat}; DALI threads in the shard run: "
          f"{worker.decoder.num_threads}")
    print("| stage | ms per batch | images/s |\n|---|---|---|")
    for name, sec_ in rows.items():
        print(f"| {name} | {sec_ * 1000:.1f} | {n / sec_:,.0f} |")
    for name, described in waits.items():
        print(f"{name}: {described}")
    for name, lines in timelines.items():
        print(f"GPU timeline, {name}:\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    main()
