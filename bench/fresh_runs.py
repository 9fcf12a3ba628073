"""Fresh-process rows (issue "A fresh run is as fast as a warm one"): `a2k classify` as a new process, exec to
exit, on Prefect's temporary server and on a running server, and the DALI peer script (`bench.dali_peer`) the
same way, at several sizes; each row's fixed cost beside its steady rate. Appends a dated table to --results.

    python -m bench.fresh_runs --data DIR --sizes 1000 100000 --model resnet50 [--link] [--steady-rate R] \
        [--timeout 600] --results bench/RESULTS.md [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.run_all import REPO, _child_env, append_results, machine_line, model_dir_for, replicate

# one mapping from a kind of fresh run to its title
KINDS = {"temporary": "a2k, temporary server", "server": "a2k, running server", "peer": "DALI peer script"}
PRIME_IMAGES = 16


@dataclass(frozen=True)
class FreshConfig:
    """What every fresh run of one benchmark shares."""

    data: Path
    sizes: tuple[int, ...]
    model_dir: str
    workdir: Path
    batch_size: int = 256
    device: str = "auto"
    num_threads: int | None = None
    hw_decoder_load: float = 0.65
    link: bool = False
    timeout: float = 600.0
    port: int | None = None
    prime: bool = True
    kinds: tuple[str, ...] = tuple(KINDS)
    tune: bool = False  # a2k runs on its own settings: `a2k tune` first, then no batch/threads/load flags

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes {self.sizes} must be one or more counts of at least 1")
        if unknown := set(self.kinds) - set(KINDS):
            raise ValueError(f"kinds {sorted(unknown)} are not among: {', '.join(KINDS)}")
        if self.batch_size < 1 or self.timeout <= 0:
            raise ValueError(f"batch_size {self.batch_size} and timeout {self.timeout} must be positive")


def _commands(kind: str, images: Path, output: Path, cfg: FreshConfig) -> list[str]:
    threads = ["--num-threads", str(cfg.num_threads)] if cfg.num_threads else []
    if kind == "peer":
        return [sys.executable, "-m", "bench.dali_peer", "--data", str(images), "--model", cfg.model_dir,
                "--output", str(output / "predictions.parquet"), "--batch-size", str(cfg.batch_size),
                "--device", cfg.device, "--hw-decoder-load", str(cfg.hw_decoder_load), *threads]
    # `python -m a2k` is the `a2k` script (the GPU machine's carried packages have no console scripts)
    own = [] if cfg.tune else ["--batch-size", str(cfg.batch_size), "--hw-decoder-load", str(cfg.hw_decoder_load),
                               *threads]
    return [sys.executable, "-m", "a2k", "classify", str(images), str(output), "--model", cfg.model_dir,
            "--device", cfg.device, *own]


def tune_a2k(cfg: FreshConfig, images: Path, env: dict) -> str:
    """`a2k tune` on the run's images in the a2k runs' A2K_HOME (untimed: done once per card); its chosen line."""
    env = {**env, "A2K_HOME": str(cfg.workdir / "a2k-home")}
    log = cfg.workdir / "logs" / "tune.log"
    rc, wall, stdout = _timed_run([sys.executable, "-m", "a2k", "tune", str(images), "--device", cfg.device],
                                  env, log, cfg.timeout)
    print(stdout, flush=True)
    chosen = next((ln for ln in stdout.splitlines() if ln.startswith("chosen:")), None)
    if rc != 0 or chosen is None:
        raise RuntimeError(f"a2k tune failed ({rc}): {_tail(log)}")
    return f"{chosen} (a2k tune, {wall:.0f} s, untimed)"


def _timed_run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int | None, float, str]:
    """(exit status or None on timeout, wall seconds from exec to exit, stdout). Output goes to files, not pipes:
    a server the run started and left behind would hold a pipe open and stretch the wall. Own session, so a
    timeout ends everything it started."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_file = log.with_suffix(".stdout")
    with open(out_file, "w") as out, open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.perf_counter() - t0
    _signal_group(proc.pid, signal.SIGTERM)  # anything the run left running
    return rc, wall, out_file.read_text(errors="replace")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _tail(log: Path, lines: int = 3) -> str:
    text = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return " / ".join(text[-lines:])[:400] or "no output"


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME, up (its /api/health answers) on enter,
    stopped on exit."""

    def __init__(self, home: Path, port: int | None, env: dict, log: Path, timeout: float) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**env, "PREFECT_HOME": str(home)}
        self.env.pop("PREFECT_API_URL", None)
        self.log, self.timeout = log, timeout

    def __enter__(self) -> "PrefectServer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.proc.returncode}: {_tail(self.log)} (log: {self.log})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_seconds = time.perf_counter() - t0
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"prefect server at {self.url} not healthy after {self.timeout:.0f} s (log: {self.log})")

    def __exit__(self, *exc) -> None:
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_run(kind: str, images: Path, n: int, tag: str, cfg: FreshConfig, env: dict) -> dict:
    """One fresh process into a fresh output: its wall, and what it says it did (a2k's run marker, the peer's
    JSON line), checked against the images it was given."""
    output = cfg.workdir / "outputs" / f"{kind}-{tag}"
    shutil.rmtree(output, ignore_errors=True)
    log = cfg.workdir / "logs" / f"{kind}-{tag}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {KINDS[kind]}, {n:,} images ... log: {log}", flush=True)
    rc, wall, stdout = _timed_run(_commands(kind, images, output, cfg), env, log, cfg.timeout)
    for line in stdout.splitlines():
        print(f"    | {line}", flush=True)
    result = {"kind": kind, "title": KINDS[kind], "images": n, "wall_s": round(wall, 3), "log": str(log)}
    if rc != 0:
        result["error"] = (f"timed out after {cfg.timeout:.0f} s" if rc is None else f"exit {rc}") + f": {_tail(log)}"
        return result
    if kind == "peer":
        said = json.loads(next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")))
        result["peer"] = said
        done = said["rows"]
    else:
        marker = json.loads((output / "_a2k_run.json").read_text())
        result["marker"] = {k: marker.get(k) for k in ("listed", "predicted", "errors", "processed_this_run",
                                                       "images_per_second", "stage_seconds")}
        done = marker["predicted"] + marker["errors"]
        if marker.get("processed_this_run") != n:
            result["error"] = f"processed {marker.get('processed_this_run')} of {n} images"
    if done != n:
        result["error"] = f"{done} rows for {n} images"
    result["rate"] = round(n / wall, 1)
    return result


def _kind_env(kind: str, cfg: FreshConfig, base: dict, server: PrefectServer | None) -> dict:
    env = {**base, "A2K_HOME": str(cfg.workdir / "a2k-home")}
    if server is not None:
        return {**env, "PREFECT_HOME": server.env["PREFECT_HOME"], "PREFECT_API_URL": server.url}
    env.pop("PREFECT_API_URL", None)
    return {**env, "PREFECT_HOME": str(cfg.workdir / "prefect-home-temporary")}


def run_fresh(cfg: FreshConfig, base_env: dict) -> tuple[list[dict], list[dict]]:
    """(results, primes): every kind at every size, each kind first primed once on a few images, untimed in the
    table (the first use of a PREFECT_HOME migrates its database; the first process pulls the libraries into the
    page cache). The running server is up only for its own runs."""
    folders = {n: cfg.workdir / f"images-{n}" for n in sorted(set(cfg.sizes))}
    for n, folder in folders.items():
        replicate(cfg.data, folder, n, cfg.link)
    prime_dir = cfg.workdir / "images-prime"
    if cfg.prime:
        replicate(cfg.data, prime_dir, PRIME_IMAGES, cfg.link)
    results, primes = [], []
    if cfg.tune:
        primes.append({"title": "tune", "note": tune_a2k(cfg, folders[max(folders)], base_env)})

    def block(kind: str, server: PrefectServer | None = None) -> None:
        env = _kind_env(kind, cfg, base_env, server)
        if cfg.prime:
            primes.append(_one_run(kind, prime_dir, PRIME_IMAGES, "prime", cfg, env))
        for n, folder in folders.items():
            results.append(_one_run(kind, folder, n, str(n), cfg, env))
            print("   " + row_line(results[-1]), flush=True)

    for kind in ("temporary", "peer"):
        if kind in cfg.kinds:
            block(kind)
    if "server" in cfg.kinds:
        try:
            with PrefectServer(cfg.workdir / "prefect-home-server", cfg.port, base_env,
                               cfg.workdir / "logs" / "prefect-server.log", cfg.timeout) as server:
                print(f"prefect server up at {server.url} in {server.start_seconds:.1f} s (not timed)", flush=True)
                block("server", server)
        except RuntimeError as e:
            results += [{"kind": "server", "title": KINDS["server"], "images": n, "error": str(e)} for n in folders]
    return results, primes


def fit_fixed_costs(results: list[dict], given: dict[str, float | None]) -> None:
    """Each row's fixed cost = wall - images / steady rate. The steady rate is the one given for its kind, else
    the fit over that kind's smallest and largest sizes: fixed = (N2*w1 - N1*w2) / (N2 - N1)."""
    for kind in KINDS:
        rows = sorted((r for r in results if r["kind"] == kind and r.get("rate") and not r.get("error")),
                      key=lambda r: r["images"])
        rate, source = given.get(kind), "given"
        if not rate and len(rows) >= 2 and rows[-1]["images"] > rows[0]["images"]:
            (n1, w1), (n2, w2) = ((r["images"], r["wall_s"]) for r in (rows[0], rows[-1]))
            rate = (n2 - n1) / (w2 - w1) if w2 > w1 else None
            source = f"fit over {n1:,} and {n2:,} images"
        for r in rows:
            if rate:
                r["steady_rate"], r["steady_from"] = round(rate, 1), source
                r["fixed_s"] = round(r["wall_s"] - r["images"] / rate, 2)


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _rate(x: float | None) -> str:
    return _fmt(x, 1 if x is not None and x < 100 else 0)  # a CPU trial's few images/s still read


def describe(r: dict) -> str:
    """What the run said of itself."""
    if r.get("error"):
        return f"**failed**: {r['error']} (log: {r.get('log', '-')})"
    if "peer" in r:
        p = r["peer"]
        return (f"pipeline built at {p['pipeline_built_s']:.1f} s and file closed at {p['seconds']:.1f} s (from "
                f"{p['clock']}), exit {r['wall_s'] - p['seconds']:.1f} s later; {p['num_threads']} DALI threads, "
                f"{p['device']}")
    m = r["marker"]
    return (f"run marker: {m['predicted']:,} predicted, {m['errors']} errors, {m['images_per_second']} images/s in "
            f"the shards, stage seconds {m['stage_seconds']}")


def row_line(r: dict) -> str:
    steady = f"{_rate(r.get('steady_rate'))} ({r['steady_from']})" if r.get("steady_rate") else "-"
    return (f"| {r['title']} | {_fmt(r['images'])} | {_fmt(r.get('wall_s'), 2)} | **{_rate(r.get('rate'))}** | "
            f"{steady} | {_fmt(r.get('fixed_s'), 1)} | {describe(r).replace('|', '/')} |")


def headline_order(results: list[dict]) -> list[dict]:
    """The largest size first (its temporary-server row is the headline), then the smaller ones."""
    kinds = list(KINDS)
    return sorted(results, key=lambda r: (-r["images"], kinds.index(r["kind"])))


def ratio_lines(results: list[dict]) -> list[str]:
    """a2k fresh / DALI peer at each size (images/s over the wall, both exec to exit)."""
    lines = ["| images | a2k temporary server / DALI peer | a2k running server / DALI peer |", "|---|---|---|"]
    for n in sorted({r["images"] for r in results}, reverse=True):
        rate = {r["kind"]: r.get("rate") for r in results if r["images"] == n and not r.get("error")}
        peer = rate.get("peer")
        lines.append(f"| {n:,} | " + " | ".join(f"{rate[k] / peer:.2f}" if rate.get(k) and peer else "-"
                                                for k in ("temporary", "server")) + " |")
    return lines


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git repository here; pass --commit)"
    return head + (" with uncommitted changes" if dirty else "")


def render(results: list[dict], primes: list[dict], cfg: FreshConfig, machine: str, commit: str, command: str) -> str:
    lines = [f"## Fresh-process runs (a fresh run is as fast as a warm one), {time.strftime('%Y-%m-%d %H:%M %Z')}",
             "", f"Machine: {machine}", "", f"Commit: {commit}", "", f"Command: `{command}`", "",
             f"Data: {', '.join(f'{n:,}' for n in sorted(set(cfg.sizes)))} files "
             f"({'hard links' if cfg.link else 'copies'} from `{cfg.data}`) · model `{cfg.model_dir}` · batch "
             f"{cfg.batch_size} · device {cfg.device} · hw_decoder_load {cfg.hw_decoder_load}"
             f"{' (the peer; a2k on its decode profile, below)' if cfg.tune else ''} · wall = exec to exit "
             "of a new process (`python -m a2k classify ...`, `python -m bench.dali_peer ...`), each into a fresh "
             "output", "",
             "| run | images | wall s | images/s (wall) | steady images/s (from) | fixed cost s | notes |",
             "|---|---|---|---|---|---|---|"]
    lines += [row_line(r) for r in headline_order(results)]
    lines += ["", "a2k fresh / DALI peer (same size, images/s over the wall):", "", *ratio_lines(results)]
    lines += [f"a2k's decoder settings: {p['note']}" for p in primes if p.get("title") == "tune"]
    primes = [p for p in primes if p.get("title") != "tune"]
    if primes:
        lines += ["", f"Primed first on {PRIME_IMAGES} images, untimed here: " + ", ".join(
            f"{p['title']} {_fmt(p.get('wall_s'), 1)} s" + (" (failed)" if p.get("error") else "") for p in primes)]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of images to replicate")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    p.add_argument("--model", default="resnet50", help="architecture (random weights) or model directory")
    p.add_argument("--link", action="store_true", help="hard links instead of copies")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None, help="DALI threads for both (default: a2k's choice)")
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--tune", action="store_true",
                   help="a2k on its own settings: `a2k tune` on the largest folder first (untimed), then its runs "
                        "without --batch-size/--num-threads/--hw-decoder-load (the peer keeps the given ones)")
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--steady-rate", type=float, default=None,
                   help="a2k's steady images/s (e.g. run_all's warm in-process row); else fitted from two sizes")
    p.add_argument("--peer-steady-rate", type=float, default=None, help="the peer's; else fitted from two sizes")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (and for the server to come up)")
    p.add_argument("--port", type=int, default=None, help="the running server's port (default: a free one)")
    p.add_argument("--no-prime", dest="prime", action="store_false", help="no untimed first run per kind")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "a2k-bench-fresh")
    p.add_argument("--results", type=Path, default=None, help="Markdown file to append the dated section to")
    p.add_argument("--json", type=Path, default=None, help="results as JSON (default: <workdir>/fresh_runs.json)")
    p.add_argument("--commit", default=None, help="the commit measured, where this tree has no .git")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    _, model_dir = model_dir_for(args.model, args.workdir)
    try:
        cfg = FreshConfig(args.data, tuple(args.sizes), model_dir, args.workdir, args.batch_size, args.device,
                          args.num_threads, args.hw_decoder_load, args.link, args.timeout, args.port, args.prime,
                          tuple(args.kinds), args.tune)
    except ValueError as e:
        raise SystemExit(f"bench.fresh_runs: {e}")
    env = _child_env(args.workdir)
    results, primes = run_fresh(cfg, env)
    fit_fixed_costs(results, {"temporary": args.steady_rate, "server": args.steady_rate,
                              "peer": args.peer_steady_rate})
    command = "python -m bench.fresh_runs " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine, commit = machine_line(env), args.commit or git_commit()
    text = render(results, primes, cfg, machine, commit, command)
    print("\n" + text)
    json_file = args.json or args.workdir / "fresh_runs.json"
    json_file.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine, "commit": commit,
                                     "command": command, "results": results, "primes": primes}, indent=2))
    print(f"JSON: {json_file}")
    append_results(args.results, text)


if __name__ == "__main__":
    main()
