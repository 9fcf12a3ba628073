"""Issue #22 on the cards at hand: what running the shards on Dask costs against the in-process runner, each run a
fresh `python -m a2k classify` (exec to exit), on the same files, in one session.

    python3 -m bench.dask_runs --images DIR --count 50000 --device cuda --model resnet50 --out $OUT/dask.md

Runs, after an untimed prime run (a fresh PREFECT_HOME migrates its database): `local` (the default runner: two shard
tasks at a time in the flow's process), `dask-temporary` (a2k's temporary dask-cuda cluster, one worker a card, two
task threads each), and a long-lived cluster started from Dask's command line (`dask scheduler` and `dask cuda worker`
on CUDA, `dask worker` on the CPU, with DASK_DISTRIBUTED__WORKER__DAEMON=False as README says) with `--nthreads 1`
and with `--nthreads 2`, each cluster started for its run and stopped after it (its start is not in the run's wall).
Per run: the CLI's images/s (the run without its start-up: the figure to compare), --count / wall, and the ratio to
`local`. On one card the ratio says what Dask and its per-task bookkeeping cost; on N cards, compare against N x
`local` of the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_all import REPO, _child_env, append_results, machine_line, model_dir_for, replicate  # noqa: E402

RATE = re.compile(r"(\d+) predicted, (\d+) errors of (\d+) images, ([\d.]+) images/s")


def long_lived_cluster(workdir: Path, threads: int, device: str, env: dict) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and one worker process (`dask cuda worker`: one a card) with `threads` task threads:
    (the scheduler's address, the processes)."""
    scheduler_file = workdir / f"scheduler-{threads}.json"
    scheduler_file.unlink(missing_ok=True)
    logs = workdir / "logs"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                               str(scheduler_file)], env=env, stdout=(logs / f"scheduler-{threads}.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    deadline = time.time() + 120
    while not scheduler_file.exists() or not scheduler_file.read_text().strip():
        if time.time() > deadline or procs[0].poll() is not None:
            raise SystemExit(f"dask scheduler did not start: {(logs / f'scheduler-{threads}.log').read_text()[-400:]}")
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    if device.startswith("cuda"):
        worker = [sys.executable, "-m", "dask", "cuda", "worker", address, "--nthreads", str(threads),
                  "--no-dashboard"]
    else:
        worker = [sys.executable, "-m", "dask", "worker", address, "--nworkers", "1", "--nthreads", str(threads),
                  "--no-dashboard"]
    procs.append(subprocess.Popen(worker, env=env, stdout=(logs / f"worker-{threads}.log").open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True))
    from distributed import Client

    with Client(address, timeout=120) as client:
        client.wait_for_workers(1, timeout=300)
    return address, procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def classify(name: str, folder: Path, n: int, args: argparse.Namespace, env: dict, extra: list[str]) -> dict:
    output = args.workdir / "outputs" / name
    shutil.rmtree(output, ignore_errors=True)
    log = args.workdir / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "a2k", "classify", str(folder), str(output), "--model", args.model_dir,
           "--device", args.device, *extra]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout,
                            start_new_session=True).returncode
        wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    row = {"run": name, "images": n, "wall_s": round(wall, 2), "wall_rate": round(n / wall, 1), "log": str(log)}
    said = RATE.search(text)
    if rc != 0 or said is None:
        return {**row, "error": f"exit {rc}: {' / '.join(ln.strip() for ln in text.splitlines()[-3:])[:400]}"}
    predicted, errors, listed, rate = said.groups()
    row |= {"cli_rate": float(rate)}
    if int(listed) != n or int(predicted) + int(errors) != n:
        row["error"] = f"{predicted} predicted + {errors} errors of {listed} listed, expected {n}"
    print(f"    {said.group(0)}; wall {wall:.1f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="a folder of photos (searched recursively)")
    p.add_argument("--count", type=int, default=50000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50", help="architecture (random weights) or model directory")
    p.add_argument("--shard-size", type=int, default=None, help="a2k's --shard-size (default: a2k's)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/a2k-bench-dask"))
    p.add_argument("--runs", nargs="+", default=["local", "dask-temporary", "dask-cli-nthreads1", "dask-cli-nthreads2"],
                   help="which runs (default: all four; local is always first, the ratios' base)")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.count < 1 or not args.images.is_dir():
        p.error(f"--count {args.count} must be at least 1 and --images {args.images} a folder")
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    folder = args.workdir / "images"
    info = replicate(args.images, folder, args.count, link=False)
    prime = args.workdir / "prime"
    replicate(args.images, prime, 16, link=False)
    _, args.model_dir = model_dir_for(args.model, args.workdir)
    env = _child_env(args.workdir)
    env.pop("PREFECT_API_URL", None)  # each run starts Prefect's temporary server, as a fresh `a2k classify` does
    env |= {"PREFECT_HOME": str(args.workdir / "prefect-home"), "A2K_HOME": str(args.workdir / "a2k-home"),
            "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "CUDA_DEVICE_MAX_CONNECTIONS": "32",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
    shard = ["--shard-size", str(args.shard_size)] if args.shard_size else []
    classify("prime", prime, 16, args, env, [])
    runs = [classify("local", folder, args.count, args, env, shard)]
    if "dask-temporary" in args.runs:
        runs.append(classify("dask-temporary", folder, args.count, args, env, [*shard, "--task-runner", "dask"]))
    for threads in [t for t in (1, 2) if f"dask-cli-nthreads{t}" in args.runs]:
        address, procs = long_lived_cluster(args.workdir, threads, args.device, env)
        try:
            runs.append(classify(f"dask-cli-nthreads{threads}", folder, args.count, args, env,
                                 [*shard, "--task-runner", "dask", "--dask-address", address]))
        finally:
            stop(procs)
    local = runs[0].get("cli_rate")
    for row in runs:
        row["ratio"] = round(row["cli_rate"] / local, 3) if local and row.get("cli_rate") else None
    command = " ".join(["python3 -m bench.dask_runs", *argv])
    lines = [f"### a2k classify on Dask against the in-process runner, fresh processes "
             f"({time.strftime('%Y-%m-%d %H:%M')} UTC)", "", f"machine: {machine_line(env)}", "",
             f"{args.count:,} images ({info['mean_kb']} KB mean), --device {args.device}, model {args.model}, "
             f"shard size {args.shard_size or 'a2k default'}; commit {os.environ.get('A2K_COMMIT', '?')}", "",
             "| run | images/s (CLI) | ratio to local | wall s | images/s (wall) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r.get('cli_rate', '-')} | {r.get('ratio', '-')} | {r['wall_s']} | {r['wall_rate']} |"
              for r in runs]
    lines += [""] + [f"error ({r['run']}): {r['error']}" for r in runs if r.get("error")]
    lines += [f"command: `{command}`", ""]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    append_results(args.out, text)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "command": command}, indent=2))
    return 0 if not any(r.get("error") for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
