"""Benchmark: classify-images end to end (files -> committed Parquet) over a replicated folder of real JPEGs.

Run on the GPU machine, e.g.:
    python3 bench/classify_folder.py --source .gpudata/imagenet-sample --count 10000 --arch resnet50
Prints one JSON line per run and a Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError):
        return "no GPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/a2k-bench"))
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--runs", type=int, default=2, help="the first run includes start-up (CUDA, cuDNN, DALI)")
    p.add_argument("--json", type=Path, default=None, help="also append the JSON lines here")
    args = p.parse_args()

    from bench.run_all import model_dir_for, replicate
    from flows.classify_images import classify_images

    images = args.workdir / "images"
    n = replicate(args.source, images, args.count, link=False)["count"]
    _, model_dir = model_dir_for(args.arch, args.workdir)
    machine = f"{gpu_name()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    for run in range(1, args.runs + 1):
        out = args.workdir / f"out-{args.arch}-{run}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        s = classify_images(input=str(images), output=str(out), model=str(model_dir), batch_size=args.batch_size,
                            shard_size=args.shard_size, device=args.device, num_threads=args.num_threads,
                            hw_decoder_load=args.hw_decoder_load)
        wall = time.perf_counter() - t0
        record = {
            "bench": "classify_folder", "run": run, "images": n, "arch": args.arch, "batch_size": args.batch_size,
            "shard_size": args.shard_size, "device": s["device"], "machine": machine,
            "hw_decoder_load": args.hw_decoder_load, "flow_wall_s": round(wall, 2),
            "end_to_end_images_per_s": round(n / wall, 1), "shard_images_per_s": s["images_per_second"],
            "stage_seconds": s["stage_seconds"], "predicted": s["predicted"], "errors": s["errors"],
        }
        print(json.dumps(record), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(record) + "\n")
    print(f"| {time.strftime('%Y-%m-%d')} | {machine} | {args.arch} b{args.batch_size} | {n} | "
          f"{record['end_to_end_images_per_s']} | {record['shard_images_per_s']} |")


if __name__ == "__main__":
    main()
