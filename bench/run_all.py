"""The one-run benchmark of issue #7: on the same files and the same model, the decode and model ceilings, a2k's
classify-images end to end, the PIL + DataLoader baseline, the naive DALI loop and Ray Data; prints a table
with the ratios and appends it, dated, with the machine and the exact command, to a Markdown file.

    python -m bench.run_all --data ../shared/data/imagenet-sample --replicate-to 20000 --model resnet50 \
        --batch-size 256 [--compressed-model DIR] [--gpu-memory-gb 6 --hw-decoder-load 0] --results bench/RESULTS.md

Each stage runs in its own process (its own CUDA context, DALI pools and peak RSS); a stage that fails or times
out is a row with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
REPLICA_MARKER = ".bench-replica.json"
DECODE_LOADS = (1.0, 0.65, 0.0)


# --- a2k end to end (runs in a stage process) ------------------------------------------------------------------

class _RssSampler:
    """Peak resident set size of this process while it runs, sampled from /proc every 20 ms."""

    def __init__(self) -> None:
        self.start_mb = self.peak_mb = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak so far is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_a2k_flow(images_dir: str, model_dir: str, output_root: str, batch_size: int | None, device: str,
                 hw_decoder_load: float, num_threads: int | None, gpu_memory_gb: float | None,
                 shard_size: int | None, task_runner: str = "local", dask_address: str | None = None) -> list[dict]:
    """The real classify-images flow, files -> committed Parquet, on Prefect's ephemeral server: once cold (server
    start, CUDA, DALI, model load), then warm into a fresh output. images/s = listed / flow wall seconds."""
    import inspect

    from flows.classify_images import classify_images

    wanted = {"input": images_dir, "model": model_dir, "batch_size": batch_size, "device": device,
              "hw_decoder_load": hw_decoder_load, "num_threads": num_threads, "gpu_memory_gb": gpu_memory_gb,
              "shard_size": shard_size, "task_runner": task_runner, "dask_address": dask_address}
    accepted = inspect.signature(classify_images.fn).parameters
    kwargs = {k: v for k, v in wanted.items() if v is not None and k in accepted}
    rows = []
    for run in ("cold", "warm"):  # the second run finds the model, DALI pipeline and server already up
        with _RssSampler() as rss:
            t0 = time.perf_counter()
            summary = classify_images(output=f"{output_root}/{run}", **kwargs)
            seconds = time.perf_counter() - t0
        processed = summary.get("processed_this_run", summary["listed"])
        if processed != summary["listed"]:  # a run that skipped images would look faster than it is
            raise RuntimeError(f"{run} run processed {processed} of {summary['listed']} listed images")
        rows.append({
            "variant": run, "images": summary["listed"], "rows": summary.get("predicted"), "seconds": seconds,
            "rss_start_mb": round(rss.start_mb), "rss_peak_mb": round(rss.peak_mb),
            "notes": f"{summary.get('device')}, task runner {summary.get('task_runner')}, "
                     f"shard images/s {summary.get('images_per_second')}, stage seconds {summary.get('stage_seconds')}, errors {summary.get('errors')}",
        })
    return rows


# --- stages ------------------------------------------------------------------------------------------------------

def _stage_functions() -> dict:
    from bench import baselines, ceilings, ray_data

    return {
        "decode_ceiling": ceilings.decode_ceiling,
        "model_ceiling": ceilings.model_ceiling,
        "a2k": run_a2k_flow,
        "pil_dataloader": baselines.run_pil_dataloader,
        "naive": baselines.run_naive_loop,
        "ray_data": ray_data.run_ray_data,
    }


def _run_stage_here(name: str, kwargs_file: str, result_file: str) -> None:
    """Inside a stage process: run one stage and write its rows and this process's peak RSS as JSON."""
    if name == "ray_data":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            Path(result_file).write_text(json.dumps({"skipped": f"ray not installed ({e})"}))
            return
    rows = _stage_functions()[name](**json.loads(Path(kwargs_file).read_text()))
    rows = rows if isinstance(rows, list) else [rows]
    usage_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(result_file).write_text(json.dumps({"rows": rows, "max_rss_mb": round(usage_self),
                                             "max_child_rss_mb": round(usage_children)}))


@dataclass
class Row:
    stage: str
    model: str
    variant: str = ""
    images: int | None = None
    seconds: float | None = None
    notes: str = ""
    error: str = ""
    skipped: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds else None


def _run_stage(name: str, title: str, model: str, kwargs: dict, workdir: Path, timeout: float, env: dict) -> list[Row]:
    """Run one stage in a fresh process and print its rows at once (a run cut off later still shows them)."""
    rows = _stage_rows(name, title, model, kwargs, workdir, timeout, env)
    for row in rows:
        print("   " + _row_line(row), flush=True)
    return rows


def _stage_rows(name: str, title: str, model: str, kwargs: dict, workdir: Path, timeout: float, env: dict) -> list[Row]:
    """One stage in a fresh process (its own session, so a timeout ends it and everything it started)."""
    stage_dir = workdir / "stages"
    stage_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{model}".replace("/", "_")
    kwargs_file, result_file, log_file = (stage_dir / f"{tag}.{ext}" for ext in ("in.json", "out.json", "log"))
    kwargs_file.write_text(json.dumps(kwargs))
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.run_all", "--stage", name, "--stage-input", str(kwargs_file),
           "--stage-output", str(result_file)]
    print(f"[{time.strftime('%H:%M:%S')}] {title} ({model}) ... log: {log_file}", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return [Row(title, model, error=f"timed out after {timeout:.0f} s (log: {log_file})")]
        finally:
            _end_group(proc.pid)
    print(f"[{time.strftime('%H:%M:%S')}]   done in {time.perf_counter() - t0:.1f} s, exit {rc}", flush=True)
    if rc != 0 or not result_file.exists():
        return [Row(title, model, error=f"exit {rc}: {_last_error(log_file)} (log: {log_file})")]
    result = json.loads(result_file.read_text())
    if "skipped" in result:
        return [Row(title, model, skipped=result["skipped"])]
    rows = []
    for r in result["rows"]:
        rate_inputs = {k: r.pop(k, None) for k in ("variant", "images", "seconds", "notes", "error")}
        r["max_rss_mb"], r["max_child_rss_mb"] = result["max_rss_mb"], result["max_child_rss_mb"]
        rows.append(Row(title, model, variant=rate_inputs["variant"] or "", images=rate_inputs["images"],
                        seconds=rate_inputs["seconds"], notes=rate_inputs["notes"] or "",
                        error=rate_inputs["error"] or "", extra=r))
        if r.get("rows") is not None and r["rows"] != rows[-1].images:
            rows[-1].notes += f"; only {r['rows']} of {rows[-1].images} rows written"
    return rows


def _end_group(pgid: int) -> None:
    """Stop what a finished stage left running in its own session (a Prefect server, Ray, DataLoader workers)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Timeout)\w*(:|$)")


def _last_error(log_file: Path) -> str:
    """The stage's last exception line (`ValueError: ...`), else the last line that mentions an error."""
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    exceptions = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    errors = exceptions or [ln for ln in lines if "error" in ln.lower()]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


# --- data and model ------------------------------------------------------------------------------------------------

def replicate(source: Path, dest: Path, count: int, link: bool, classes: int = 100) -> dict:
    """`count` files from `source` (recursively), round robin, as distinct names in `classes` class folders.
    Copies by default (distinct inodes, as a real folder has); hard links with `link`. Reused when unchanged."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"--data {source}: no images (*.jpg, *.jpeg, *.png) found")
    info = {"source": str(source.resolve()), "count": count, "link": link, "distinct": len(files),
            "mean_kb": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1)}
    marker = dest / REPLICA_MARKER
    if marker.exists() and json.loads(marker.read_text()) == info:
        return info
    shutil.rmtree(dest, ignore_errors=True)
    for i in range(count):
        src = files[i % len(files)]
        target = dest / f"c{i % classes:03d}" / f"{i:07d}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.link(src, target)
        else:
            shutil.copyfile(src, target)
    marker.write_text(json.dumps(info))
    return info


def model_dir_for(spec: str, workdir: Path) -> tuple[str, str]:
    """(label, directory): a model directory as given, or a registered architecture built with random weights
    for 1000 classes (speed does not depend on the weights)."""
    path = Path(spec).expanduser()
    if (path / "model.json").exists():
        return path.name, str(path.resolve())
    import torch

    from tasks.models.entry import build_model, default_preprocessing, list_architectures, save_model_dir

    if spec not in list_architectures():
        raise SystemExit(f"--model {spec!r} is neither a model directory (with model.json) nor an architecture; "
                         f"architectures: {', '.join(list_architectures())}")
    directory = workdir / "models" / spec
    if not (directory / "model.json").exists():
        torch.manual_seed(0)
        pre = default_preprocessing(spec)
        save_model_dir(build_model(spec, 1000, pre), directory, name=f"bench-{spec}", version="1", architecture=spec,
                       class_names=[f"class_{i:04d}" for i in range(1000)], preprocessing=pre)
    return spec, str(directory)


# --- report --------------------------------------------------------------------------------------------------------

def machine_line(env: dict) -> str:
    """GPU name (nvidia-smi, else torch in a throw-away process), CPU count and the versions that matter."""
    from importlib import metadata

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError):
        probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
        gpu = done.stdout.strip() or "GPU unknown"
    versions = []
    for dist in ("torch", "torchvision", "nvidia-dali-cuda130", "prefect", "pyarrow", "ray"):
        try:
            versions.append(f"{dist.replace('nvidia-dali-cuda130', 'DALI')} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    import platform

    return f"{gpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, " + ", ".join(versions)


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _find(rows: list[Row], stage: str, model: str, variant: str | None = None) -> Row | None:
    for r in rows:
        if r.stage.startswith(stage) and r.model == model and r.rate and (variant is None or r.variant == variant):
            return r
    return None


def _row_line(r: Row) -> str:
    rss = r.extra.get("rss_peak_mb") or r.extra.get("max_rss_mb")
    notes = (r.error and f"**failed**: {r.error}") or (r.skipped and f"skipped: {r.skipped}") or r.notes
    return (f"| {r.stage} | {r.variant} | {r.model} | {_fmt(r.images)} | {_fmt(r.seconds, 2)} | **{_fmt(r.rate)}** | "
            f"{_fmt(rss)} | {notes.replace('|', '/')} |")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _ratios(rows: list[Row], model: str, load: float, gpus: int = 1) -> str:
    e2e = _find(rows, "3.", model, "warm")
    variants = ("DALI cpu", f"hw_decoder_load {load}")  # a model without its own decode row shares another's
    decode = next((r for r in rows if r.stage.startswith("1.") and r.rate and r.variant in variants and r.model == model),
                  None) or next((r for r in rows if r.stage.startswith("1.") and r.rate and r.variant in variants), None)
    model_ceiling = _find(rows, "2.", model)
    ceiling = min((r.rate for r in (decode, model_ceiling) if r), default=None)
    if ceiling is not None:
        ceiling *= gpus  # the ceilings are one card's; a Dask run spreads the shards over every card
    ray_runs = [r for r in rows if r.stage.startswith("6.") and r.model == model and r.rate]
    ray_best = max((r.rate for r in ray_runs), default=None)
    rate = lambda r: r.rate if r else None  # noqa: E731
    bound = "-" if not (decode and model_ceiling) else ("decode" if decode.rate <= model_ceiling.rate else "model")
    bound += f" x {gpus} GPUs" if gpus > 1 else ""
    return (f"| {model} | {_fmt(rate(e2e))} | {_fmt(ceiling)} ({bound}) | {_ratio(rate(e2e), ceiling)} | "
            f"{_ratio(rate(e2e), rate(_find(rows, '4.', model)))} | {_ratio(rate(e2e), rate(_find(rows, '5.', model)))} | "
            f"{_ratio(rate(e2e), ray_best)} |")


def visible_gpus() -> int:
    """The cards a temporary dask-cuda cluster gives a worker each: CUDA_VISIBLE_DEVICES, else every card."""
    if visible := os.environ.get("CUDA_VISIBLE_DEVICES"):
        return len([d for d in visible.split(",") if d.strip()])
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listed.splitlines()))


def _fresh_row(result: dict, model: str) -> Row:
    """A fresh-process result (bench.fresh_runs) as a row, its fixed cost in the notes."""
    from bench.fresh_runs import describe

    fixed = (f"fixed cost {result['fixed_s']:,.1f} s at {result['steady_rate']:,.0f} images/s "
             f"({result['steady_from']}); " if result.get("fixed_s") is not None else "")
    return Row("0. fresh process, exec to exit", model, variant=result["title"], images=result["images"],
               seconds=result.get("wall_s") if not result.get("error") else None,
               notes=fixed + describe(result), error=result.get("error", ""), extra={"fresh": result})


def _fresh_lines(rows: list[Row], model: str) -> tuple[list[str], list[str]]:
    """(table rows, ratio lines) of the fresh-process runs: the largest size first (the headline); a2k's fixed
    cost against its warm in-process run where there is one, else fitted from two sizes."""
    from bench import fresh_runs

    fresh = [r.extra["fresh"] for r in rows if "fresh" in r.extra]
    if not fresh:
        return [], []
    warm = _find(rows, "3.", model, "warm")
    fresh_runs.fit_fixed_costs(fresh, {"temporary": warm and warm.rate, "server": warm and warm.rate})
    for f in fresh:
        if warm and f["kind"] != "peer" and f.get("steady_rate"):
            f["steady_from"] = "the warm in-process run"
    table = [_row_line(_fresh_row(f, model)) for f in fresh_runs.headline_order(fresh)]
    return table, ["", "a2k fresh / DALI peer (same size, both a new process, images/s over exec to exit):", "",
                   *fresh_runs.ratio_lines(fresh)]


def render(rows: list[Row], args, data: dict | None, models: list[str], machine: str, command: str) -> str:
    data_line = ("Data: no in-process stage run" if data is None else
                 f"Data: {data['count']:,} files ({'hard links' if data['link'] else 'copies'} of {data['distinct']} "
                 f"distinct images, mean {data['mean_kb']} kB, from `{data['source']}`)")
    if args.fresh_sizes:
        data_line += (f" · fresh runs: {', '.join(f'{n:,}' for n in sorted(set(args.fresh_sizes)))} files, "
                      f"{models[0]} only, not capped")
    fresh_table, fresh_ratios = _fresh_lines(rows, models[0])
    lines = [
        f"## One-run benchmark (issue #7), {time.strftime('%Y-%m-%d %H:%M %Z')}", "",
        f"Machine: {machine}", "",
        f"{data_line} · models: {', '.join(models)} · batch "
        f"{args.batch_size} · hw_decoder_load {args.hw_decoder_load} · gpu_memory_gb {args.gpu_memory_gb or 'not capped'}"
        f" · device {args.device} · task runner {args.task_runner}"
        f"{f' at {args.dask_address} (long-lived workers)' if args.dask_address else ''}", "",
        f"Command: `{command}`", "",
        "| stage | variant | model | images | seconds | images/s | peak RSS MiB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += fresh_table + [_row_line(r) for r in rows if "fresh" not in r.extra]
    lines += ["", "Ratios (a2k's warm run; Ray Data: its best run; the decode ceiling at the configured load):", "",
              "| model | a2k images/s | min(decode, model ceiling) | a2k / ceiling | a2k / PIL DataLoader | "
              "a2k / naive | a2k / Ray Data |", "|---|---|---|---|---|---|---|"]
    gpus = visible_gpus() if args.task_runner == "dask" else 1
    lines += [_ratios(rows, m, args.hw_decoder_load, gpus) for m in models]
    lines += fresh_ratios
    for m in models:
        runs = [r for r in rows if r.stage.startswith("3.") and r.model == m and r.rate]
        if runs:
            lines += ["", f"Host memory of the a2k process ({m}): peak RSS {_fmt(runs[0].extra.get('max_rss_mb'))} MiB "
                      "over both runs; sampled per run, " + ", ".join(
                          f"{r.variant}: {_fmt(r.extra.get('rss_start_mb'))} -> peak {_fmt(r.extra.get('rss_peak_mb'))} MiB"
                          for r in runs) + " (the Prefect server is a separate process, not counted)."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="folder of images to replicate")
    p.add_argument("--replicate-to", type=int, default=20_000)
    p.add_argument("--link", action="store_true", help="hard links instead of copies")
    p.add_argument("--model", default="resnet50", help="architecture (random weights) or model directory")
    p.add_argument("--compressed-model", help="a second model directory, measured the same way")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--a2k-auto-batch", action="store_true",
                   help="let classify-images pick its batch size for the free GPU memory (the others keep --batch-size)")
    p.add_argument("--shard-size", type=int, default=None, help="classify-images shard size (default: the flow's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None,
                   help="DALI threads (default: a2k's own choice for a2k and naive, all cores for the decode ceiling)")
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="cap every GPU stage, e.g. 6 for an A2000")
    p.add_argument("--ray-runs", type=int, default=2)
    p.add_argument("--task-runner", choices=["local", "dask"], default="local",
                   help="a2k's shard tasks in process, or on a temporary Dask cluster: one worker per GPU with "
                        "dask-cuda (the multi-GPU run; the a2k ratio is then against the ceiling times the GPUs)")
    p.add_argument("--dask-address", default=None,
                   help="with --task-runner dask: a running scheduler (long-lived workers, e.g. `dask cuda worker`) "
                        "instead of a temporary cluster; its workers are assumed to be this machine's visible GPUs")
    p.add_argument("--fresh-sizes", type=int, nargs="+", default=None,
                   help="also `a2k classify` as a new process (temporary server, running server) and the DALI peer "
                        "script, exec to exit, at these sizes (bench.fresh_runs), e.g. 1000 100000")
    p.add_argument("--stages", nargs="+", default=None, help="a subset of the stages (default: all)",
                   choices=["fresh", "decode_ceiling", "model_ceiling", "a2k", "pil_dataloader", "naive", "ray_data"])
    p.add_argument("--stage-timeout", type=float, default=1800)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "a2k-bench-all")
    p.add_argument("--results", type=Path, default=None, help="Markdown file to append the dated section to")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-input", help=argparse.SUPPRESS)
    p.add_argument("--stage-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.stage and args.data is None:
        p.error("--data is required")
    if args.stages and "fresh" in args.stages and not args.fresh_sizes:
        p.error("--stages fresh needs --fresh-sizes")
    if args.fresh_sizes and min(args.fresh_sizes) < 1:
        p.error(f"--fresh-sizes {args.fresh_sizes} must be at least 1")
    if args.replicate_to < 1 or args.batch_size < 1:
        p.error("--replicate-to and --batch-size must be at least 1")
    if args.dask_address and args.task_runner != "dask":
        p.error(f"--dask-address {args.dask_address} needs --task-runner dask")
    if not 0.0 <= args.hw_decoder_load <= 1.0:
        p.error(f"--hw-decoder-load {args.hw_decoder_load} must be in [0, 1]")
    return args


def _plan(args, images: str, models: list[tuple[str, str]]) -> list[tuple[str, str, str, dict]]:
    """(stage, title, model label, kwargs) for every stage process to run."""
    out = args.workdir / "outputs"
    shutil.rmtree(out, ignore_errors=True)
    common = {"batch_size": args.batch_size, "device": args.device, "gpu_memory_gb": args.gpu_memory_gb}
    loads = sorted({*DECODE_LOADS, args.hw_decoder_load}, reverse=True)
    plan = []
    seen_pre = set()
    from tasks.models.entry import read_entry

    for label, mdir in models:
        pre = json.dumps(read_entry(mdir).preprocessing.to_dict(), sort_keys=True)
        if pre not in seen_pre:  # the decode ceiling depends on the preprocessing only
            seen_pre.add(pre)
            plan.append(("decode_ceiling", "1. decode ceiling (DALI alone)", label, {
                "images_dir": images, "model_dir": mdir, "loads": loads, "num_threads": args.num_threads, **common}))
        plan += [
            ("model_ceiling", "2. model ceiling (forward alone)", label,
             {"model_dir": mdir, "images": args.replicate_to, **common}),
            ("a2k", "3. a2k classify-images end to end", label, {
                "images_dir": images, "model_dir": mdir, "output_root": str(out / f"a2k-{label}"),
                "hw_decoder_load": args.hw_decoder_load, "num_threads": args.num_threads,
                "shard_size": args.shard_size, "task_runner": args.task_runner, "dask_address": args.dask_address,
                **common,
                **({"batch_size": None} if args.a2k_auto_batch else {})}),
            ("pil_dataloader", "4. PIL + DataLoader baseline", label,
             {"images_dir": images, "model_dir": mdir, "output": str(out / f"pil-{label}"), **common}),
            ("naive", "5. naive loop (DALI -> model -> Parquet)", label, {
                "images_dir": images, "model_dir": mdir, "output": str(out / f"naive-{label}"),
                "hw_decoder_load": args.hw_decoder_load, "num_threads": args.num_threads, **common}),
            ("ray_data", "6. Ray Data batch inference", label, {
                "images_dir": images, "model_dir": mdir, "output_root": str(out / f"ray-{label}"),
                "runs": args.ray_runs, **common}),
        ]
    return [p for p in plan if args.stages is None or p[0] in args.stages]


def _fresh_stage(args, label: str, model_dir: str, env: dict) -> list[Row]:
    """The fresh-process runs of bench.fresh_runs on the first model, each run a new process under
    --stage-timeout; they print their rows as they go."""
    from bench.fresh_runs import FreshConfig, run_fresh

    cfg = FreshConfig(args.data, tuple(args.fresh_sizes), model_dir, args.workdir / "fresh", args.batch_size,
                      args.device, args.num_threads, args.hw_decoder_load, args.link, args.stage_timeout)
    print(f"[{time.strftime('%H:%M:%S')}] 0. fresh processes ({label}): {', '.join(map(str, cfg.sizes))} images",
          flush=True)
    results, _primes = run_fresh(cfg, env)
    return [_fresh_row(r, label) for r in results]


def _child_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))  # its own ephemeral server database
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.stage:
        _run_stage_here(args.stage, args.stage_input, args.stage_output)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    images = str(args.workdir / "images")
    models = [model_dir_for(args.model, args.workdir)]
    if args.compressed_model:
        label, directory = model_dir_for(args.compressed_model, args.workdir)
        models.append((f"{label} (compressed)" if label == models[0][0] else label, directory))
    env = _child_env(args.workdir)
    plan = _plan(args, images, models)
    data = replicate(args.data, Path(images), args.replicate_to, args.link) if plan else None
    rows: list[Row] = []
    if args.fresh_sizes and (args.stages is None or "fresh" in args.stages):
        rows += _fresh_stage(args, *models[0], env)  # first: the headline, and shown even if a later stage hangs
    for name, title, label, kwargs in plan:
        rows += _run_stage(name, title, label, kwargs, args.workdir, args.stage_timeout, env)
    command = "python -m bench.run_all " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(rows, args, data, [m for m, _ in models], machine_line(env), command)
    print("\n" + text)
    append_results(args.results, text)


def append_results(results: Path | None, text: str) -> None:
    """Append a dated section to the results file, when one is given."""
    if results:
        with open(results, "a") as f:
            f.write("\n" + text)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
