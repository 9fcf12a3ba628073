"""Benchmark: model acceleration for a small card, measured on an A2000-class budget of a bigger one.

A harder task than the digits, built from real photographs: each photo of DIR (e.g. ../shared/data/imagenet-sample,
500 ImageNet photos) upright and turned by 90, 180 and 270 degrees, the turn as the class (4 classes, 4 images a
photo; a ResNet-50 trained from scratch on it is far from 100%, so a 1-point loss shows). Then:

1. trains the parent (`--arch`, default resnet50) with the train-model flow (no mirror flips: they would swap 90
   and 270);
2. runs the compress-model flow once per chain (default: compile; distill:resnet18 + compile; prune + distill +
   compile) with `--target` (default a2000): each child is timed against the parent through the executor on the
   target's share of the card's SMs, gated on speed (`--min-speedup`) and accuracy (`--max-accuracy-drop`);
3. runs `a2k classify --target` as a fresh process, files to committed Parquet, for the parent and the fastest
   child that passed, on `--images` files (the dataset replicated as hard links);
4. times the compile child against the parent through the executor on the whole card.

Each step's rows are printed and appended to `--results` as soon as they exist (a run cut short keeps them).
    python -m bench.accelerate --data /tmp/imagenet-sample --epochs 12 --images 20000 --results $OUT/accel.md
CPU smoke run: python -m bench.accelerate --data DIR --arch seed-cnn --limit 40 --epochs 1 --device cpu \
    --target "" --chains compile --images 200 --results /tmp/x.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from bench.run_all import REPO, _child_env, machine_line, replicate

DEFAULT_CHAINS = ["compile", "distill:resnet18,epochs=15+compile", "prune:0.5,epochs=6,distill=true+compile"]
TURNS = (0, 90, 180, 270)


def _turn_one(args: tuple[str, str]) -> int:
    from PIL import Image, ImageOps

    src, dest = Path(args[0]), Path(args[1])
    with Image.open(src) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
        for turn in TURNS:
            target = dest / f"turn{turn:03d}" / f"{src.stem}.jpg"
            upright.rotate(turn, expand=True).save(target, quality=92)
    return len(TURNS)


def build_turns_dataset(source: Path, dest: Path, limit: int | None) -> dict:
    """`<dest>/turn000|turn090|turn180|turn270/<photo>.jpg` from the photos under `source` (reused when there)."""
    photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    photos = photos[:limit] if limit else photos
    marker = dest / ".turns.json"
    info = {"source": str(source.resolve()), "photos": len(photos), "classes": [f"turn{t:03d}" for t in TURNS]}
    if marker.exists() and json.loads(marker.read_text()) == info:
        return info
    shutil.rmtree(dest, ignore_errors=True)
    for turn in TURNS:
        (dest / f"turn{turn:03d}").mkdir(parents=True)
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        images = sum(pool.map(_turn_one, [(str(p), str(dest)) for p in photos]))
    marker.write_text(json.dumps(info))
    return {**info, "images": images}


def append_results(results: Path | None, text: str) -> None:
    """Append to the results file as is (table rows go on consecutive lines), when one is given."""
    if results:
        with open(results, "a") as f:
            f.write(text)


def _first_batch(stdout: str) -> float | None:
    """`first batch at X s` from the start-up line every fresh `a2k classify` prints."""
    match = re.search(r"first batch at ([0-9.]+) s", stdout)
    return float(match.group(1)) if match else None


def _row(label: str, r: dict) -> str:
    p, c = r["parent_measures"], r["child_measures"]
    return (f"| {label} | {r['child']} | {c['top1']:.4f} ({(c['top1'] - p['top1']) * 100:+.2f} pts) | "
            f"{c['flops'] / 1e9:.2f} ({c['flops'] / p['flops']:.2f}x) | {p['images_per_second']:.0f} | "
            f"{c['images_per_second']:.0f} | x{r['speedup']:.2f} | {'passed' if r['passed'] else 'REJECTED'}: "
            f"{r['reason']} |")


def fresh_classify(images: Path, model_dir: str, target: str | None, workdir: Path, label: str, batch_size: int,
                   device: str, timeout: float) -> dict:
    """`python -m a2k classify` as a new process, exec to exit, into a fresh output."""
    from bench.fresh_runs import _timed_run

    out = workdir / "fresh-out" / label
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "a2k", "classify", str(images), str(out), "--model", model_dir,
           "--batch-size", str(batch_size), "--device", device, *(["--target", target] if target else [])]
    env = {**_child_env(workdir), "PREFECT_HOME": str(workdir / "prefect-home-fresh")}
    rc, wall, stdout = _timed_run(cmd, env, workdir / "logs" / f"fresh-{label}.log", timeout)
    run = json.loads((out / "_a2k_run.json").read_text()) if (out / "_a2k_run.json").exists() else {}
    listed = run.get("listed", 0)
    return {"label": label, "rc": rc, "wall_s": round(wall, 2), "listed": listed, "predicted": run.get("predicted"),
            "errors": run.get("errors"), "images_per_second_wall": round(listed / wall, 1) if listed else None,
            "first_batch_s": _first_batch(stdout), "stdout_tail": stdout[-600:], "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of photos (e.g. ../shared/data/imagenet-sample)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/a2k-bench-accel"))
    p.add_argument("--limit", type=int, default=None, help="use the first N photos only")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--chains", nargs="+", default=DEFAULT_CHAINS, help="each a '+'-joined chain")
    p.add_argument("--target", default="a2000", help="target profile ('' for none: time on the whole device)")
    p.add_argument("--min-speedup", type=float, default=1.2)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=20000, help="files for the fresh files-to-Parquet runs (0: none)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    target = args.target or None

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["A2K_HOME"] = str(args.workdir / "home")
    from prefect.testing.utilities import prefect_test_harness

    from flows.compress_model import compress_model
    from flows.train_model import train_model
    from tasks.compress.measure import measure_speeds
    from tasks.devices import resolve_device
    from tasks.models.registry import get_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(args.device)
    # A2K_COMMIT first: the GPU machine's copy of the tree may carry a stale .git
    commit = os.environ.get("A2K_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "unknown"
    head = (f"\n## Model acceleration on {target or str(dev)} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine: {machine_line(_child_env(args.workdir))}. Commit {commit}. Command: `python -m bench.accelerate "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    append_results(args.results, head)
    report: dict = {"target": target, "device": str(dev)}
    t0 = time.perf_counter()
    data = build_turns_dataset(args.data, args.workdir / "turns", args.limit)
    registry = str(args.workdir / "registry")
    shutil.rmtree(registry, ignore_errors=True)
    with prefect_test_harness(server_startup_timeout=180):
        trained = train_model(dataset=str(args.workdir / "turns"), name="turns", arch=args.arch, epochs=args.epochs,
                              flip_probability=0.0, device=str(dev), registry=registry)
        line = (f"\nTask: the turn of a photo (0/90/180/270 degrees) from {data['photos']} real photos, "
                f"{4 * data['photos']} images; parent {trained['ref']} ({args.arch}, {args.epochs} epochs from "
                f"scratch, {time.perf_counter() - t0:.0f} s with the dataset): {trained['metrics']}\n\n"
                f"| chain | child | top-1 on the test split | GFLOPs / image | parent images/s | child images/s | "
                f"speed-up | gate |\n|---|---|---|---|---|---|---|---|\n")
        print(line, flush=True)
        append_results(args.results, line)
        results = []
        for chain in args.chains:
            t1 = time.perf_counter()
            try:
                r = compress_model(model=trained["ref"], recipes=chain.split("+"), target=target, device=str(dev),
                                   batch_size=args.batch_size, min_speedup=args.min_speedup,
                                   max_accuracy_drop=args.max_accuracy_drop, registry=registry)
            except Exception as e:  # noqa: BLE001 - a chain that fails is a row saying why; the others still run
                row = f"| {chain} | failed | {type(e).__name__}: {str(e)[:300]} | | | | | |"
                results.append({"chain": chain, "error": f"{type(e).__name__}: {e}"})
            else:
                row = _row(chain, r) + f" <!-- {time.perf_counter() - t1:.0f} s -->"
                results.append({"chain": chain, **{k: r[k] for k in (
                    "child", "passed", "reason", "speedup", "measured", "steps", "comparison")}})
            print(row, flush=True)
            append_results(args.results, row + "\n")
        report["chains"] = results
        parent_dir = get_model(trained["ref"], registry).url
        passed = [r for r in results if r.get("passed")]
        best = max(passed or [r for r in results if "child" in r], key=lambda r: r["speedup"], default=None)
        compiled = next((r for r in results if r.get("chain") == "compile" and "child" in r), None)
        if compiled and dev.is_cuda:
            whole = measure_speeds({"parent": parent_dir, "compile": get_model(compiled["child"], registry).url},
                                   dev, args.batch_size)
            report["whole_card"] = whole
            line = (f"\nWhole card, executor only (batch {args.batch_size}, CUDA graph, medians of 3 turns): parent "
                    f"{whole['parent']['images_per_second']:.0f} images/s, compile child "
                    f"{whole['compile']['images_per_second']:.0f} "
                    f"(x{whole['compile']['images_per_second'] / whole['parent']['images_per_second']:.2f})\n")
            print(line, flush=True)
            append_results(args.results, line)
    if args.images and best is not None:
        images = args.workdir / "fresh-images"
        replicate(args.workdir / "turns", images, args.images, link=True)
        child_dir = get_model(best["child"], registry).url
        fresh_classify(images, parent_dir, target, args.workdir, "prime", args.batch_size, str(dev), args.timeout)
        rows = [fresh_classify(images, d, target, args.workdir, label, args.batch_size, str(dev), args.timeout)
                for label, d in (("parent", parent_dir), ("child", child_dir))]
        report["fresh"] = rows
        ratio = (rows[0]["wall_s"] / rows[1]["wall_s"]) if rows[1]["wall_s"] else None
        lines = [f"\nFresh process, files to committed Parquet, {args.images} files, `a2k classify"
                 f"{f' --target {target}' if target else ''}` (exec to exit; a first untimed run primed the page "
                 f"cache):\n",
                 "| model | wall s | images/s over the wall | first batch at s | predicted | errors | rc |",
                 "|---|---|---|---|---|---|---|"]
        for label, r in zip(("parent " + trained["ref"], f"child {best['child']} ({best['chain']})"), rows):
            lines.append(f"| {label} | {r['wall_s']} | {r['images_per_second_wall']} | "
                         f"{r['first_batch_s']} | {r['predicted']} | {r['errors']} | {r['rc']} |")
        lines.append(f"\nChild / parent, over the wall: x{ratio:.2f}\n" if ratio else "")
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        append_results(args.results, text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
