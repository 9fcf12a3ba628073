"""Time each stage of one classify batch separately (read+check, DALI decode, model top-k, Arrow rows).

    python3 bench/profile_stages.py --source DIR [--arch resnet50] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--readers", type=int, nargs="+", default=[16], help="reader thread counts to compare")
    args = p.parse_args()

    import tempfile

    from bench.run_all import model_dir_for
    from tasks.classify import RunContext, ShardClassifier
    from tasks.decode import check_header, load_blobs

    files = sorted(str(f) for f in args.source.iterdir() if f.suffix.lower() in (".jpeg", ".jpg"))
    uris = (files * (args.batch_size // len(files) + 1))[: args.batch_size]
    _, model_dir = model_dir_for(args.arch, Path(tempfile.mkdtemp()))
    worker = ShardClassifier(str(model_dir), args.device, args.batch_size, None)
    n = len(uris)
    rows = {}
    for count in args.readers:
        with ThreadPoolExecutor(count) as readers:
            rows[f"read + header check ({count} threads)"] = timed(lambda: load_blobs(uris, readers), args.repeat)
            blobs = load_blobs(uris, readers)
    rows.update({
        "header check only (1 thread)": timed(lambda: [check_header(b) for b in blobs], args.repeat),
        f"DALI decode+resize+crop+normalize ({worker.device})": timed(lambda: worker.decoder.decode(blobs), args.repeat),
    })
    images = worker.decoder.decode(blobs).images
    rows["model top-k incl. copy to host"] = timed(lambda: worker.classifier.top_k(images, 5), args.repeat)
    ctx = RunContext("m", "1", "x" * 64, "run", 5)
    rows["whole batch (ShardClassifier.run)"] = timed(lambda: worker.run(uris, [None] * n, ctx), args.repeat)
    print(f"batch of {n} images, {args.arch}, median of {args.repeat}")
    print("| stage | ms per batch | images/s |\n|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec * 1000:.1f} | {n / sec:,.0f} |")


if __name__ == "__main__":
    main()
