"""The `a2k` command line: each command runs a Prefect flow or a registry verb.

A flow command checks its arguments against the flow's signature before anything heavy is imported; in a fresh
process (Prefect not yet loaded) `classify` then starts Prefect's temporary server, when no server is configured,
and builds its shard worker while the server comes up (a2k.server, flows.classify_images.prepare_worker).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import sys
import threading
import time
import traceback
from typing import Any

from a2k import cli_compress, cli_models, cli_tune, quiet, signals
from a2k.cli_progress import terminal_progress
from a2k.clock import process_age
from a2k.cli_logs import is_refusal, quiet_refusals
from a2k.cli_flows import FlowSpec, add_flow_arguments, check_flow_arguments, flow_arguments


def _check_model_name(v: str) -> str:
    from tasks.models.card import check_model_name

    return check_model_name(v)


def _train_checks() -> dict[str, Any]:
    from flows.params import check_architecture, check_dataset_folder

    return {"dataset": check_dataset_folder, "name": _check_model_name, "arch": check_architecture}


def _classify_checks() -> dict[str, Any]:
    from flows.params import check_input_source, check_output_target

    return {"input": check_input_source, "output": check_output_target}  # the model: once the server is starting


FLOWS = {
    "classify": (FlowSpec("flows.classify_images", "classify_images"), ("input", "output"),
                 "classify a folder of images (or a .parquet manifest) into Parquet"),
    "train": (FlowSpec("flows.train_model", "train_model"), ("dataset",),
              "train a classifier on <root>/<class>/<file> and register it"),
    "demo": (FlowSpec("flows.demo", "demo"), (),
             "digits dataset -> train seed-cnn -> promote -> classify the test split"),
}
SERVER_TIMEOUT_S = 180.0  # a cold machine's first start (database migrations) can take long


def _parser(command: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2k", description="GPU batch image classification to Parquet.")
    p.add_argument("--debug", action="store_true", help="on an error, print its traceback before its line (may be "
                                                         "given anywhere on the command line)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (spec, positional, text) in FLOWS.items():
        c = sub.add_parser(name, help=text, description=text)
        if command == name:  # the options of the command given (read from the flow's source: cheap, but not free)
            add_flow_arguments(c, spec, positional)
    cli_models.add_parsers(sub)
    cli_compress.add_parsers(sub)
    cli_tune.add_parsers(sub)
    _say_defaults(p)
    return p


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands under `p` by name, sub-commands as 'models list'."""
    found = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, c in action.choices.items():
                found[name] = c
                found |= {f"{name} {k}": v for k, v in subparsers(c).items()}
    return found


def _say_defaults(p: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default where it has one its help does not say (None's meaning and a
    switch's off are the help's to say)."""
    for c in [p, *subparsers(p).values()]:
        for action in c._actions:
            default = action.default
            if not action.help or "(default" in action.help or default in (None, False, "", argparse.SUPPRESS):
                continue
            shown = " ".join(map(str, default)) if isinstance(default, list) else getattr(default, "value", default)
            action.help = f"{action.help} (default: {shown})"


def _classify(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The classify command: checks, then (fresh process) the temporary server and the shard worker in parallel
    with the imports, then the flow; says where the start-up went. Returns the run's summary and the shard worker
    built ahead (None when none was)."""
    from flows.params import check_model_spec

    spec = FLOWS["classify"][0]
    params = check_flow_arguments(spec, flow_arguments(args, spec), _classify_checks())
    steps = {"checks": process_age()}
    fresh = "prefect" not in sys.modules  # an in-process caller (tests, a notebook) keeps Prefect's own way
    server = None
    if fresh:
        from a2k.server import TemporaryServer, temporary_server_wanted

        server = TemporaryServer() if temporary_server_wanted() else None
    # an unknown model is refused while the server starts (stopping it does not wait), not once it is up; before the
    # worker's build, which would hold the imports the check needs
    t0 = time.perf_counter()
    check_model_spec(params["model"], params["registry"])
    steps["model check"] = time.perf_counter() - t0
    worker: dict[str, Any] = {}
    warm = None
    if fresh and params["task_runner"].value == "local":
        def build() -> None:  # needs torch and DALI, not Prefect: it overlaps the flow module's import below
            t = time.perf_counter()
            try:
                from tasks.classify.shard import prepare_shard_worker

                built = prepare_shard_worker(params["model"], params["registry"], params["device"],
                                             params["batch_size"], params["num_threads"], params["hw_decoder_load"],
                                             params["gpu_memory_gb"], params["target"],
                                             reads_store="://" in str(params["input"]))
                worker["seconds"] = time.perf_counter() - t
                worker["built"] = built
                steps = built.build_steps
                worker["steps"] = {"imports": worker["seconds"] - built.build_seconds - steps.get("store readers", 0),
                                   **steps}
            except Exception as e:  # noqa: BLE001 - the run builds it again and raises what it meets
                worker["error"] = e

        warm = threading.Thread(target=build, name="a2k-prepare-worker", daemon=True)
        warm.start()
    t0 = time.perf_counter()
    flow = spec.load()
    quiet_refusals(args.debug)
    steps["imports"] = time.perf_counter() - t0
    if server is not None:
        steps["server wait"] = server.wait_ready(SERVER_TIMEOUT_S)
        steps["server up"] = time.perf_counter() - server.started
    began = process_age()
    try:
        summary = flow(**params)
    finally:
        if warm is not None:
            warm.join()
    if "seconds" in worker:
        steps["worker"] = worker["seconds"]
        steps |= {f"worker {k}": v for k, v in worker["steps"].items()}
    started = summary.get("first_batch_at")
    first = (time.time() - started) if started else None  # how long ago the first batch reached the model
    total = process_age()
    summary["startup"] = {"flow_began_s": round(began, 2), **{k: round(v, 2) for k, v in steps.items()},
                          "first_batch_s": round(total - first, 2) if first is not None else None,
                          "process_s": round(total, 2)}
    return summary, worker.get("built")


def _startup_line(s: dict[str, Any]) -> str:
    st = s["startup"]
    parts = [f"checks {st['checks']:.1f}", f"model check {st['model check']:.1f}", f"imports {st['imports']:.1f}"]
    if "server up" in st:
        parts.append(f"server {st['server up']:.1f} (parallel; waited {st['server wait']:.1f})")
    if "worker" in st:
        inner = ", ".join(f"{k.removeprefix('worker ')} {v:.1f}" for k, v in st.items() if k.startswith("worker "))
        parts.append(f"shard worker {st['worker']:.1f} (parallel: {inner})")
    first = f"first batch at {st['first_batch_s']:.1f} s" if st["first_batch_s"] is not None else "no batch"
    return f"started: flow at {st['flow_began_s']:.1f} s, {first} ({', '.join(parts)}); {st['process_s']:.1f} s in all"


def _flow_call(name: str, args: argparse.Namespace) -> Any:
    """Run the command's flow with its arguments, checked against its signature before any Prefect work."""
    spec = FLOWS[name][0]
    params = check_flow_arguments(spec, flow_arguments(args, spec), _train_checks() if name == "train" else None)
    flow = spec.load()
    quiet_refusals(args.debug)
    return flow(**params)


def _exit_now(code: int, worker: Any) -> None:
    """End a fresh classify process once its run is committed and said: its reader processes stopped and the
    exit handlers run (Prefect's log and event flush, the temporary server's stop), then out without tearing down
    CUDA, DALI and the interpreter (about 2 s on an H200 that change nothing on disk)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if worker is not None:
        worker.close()
    atexit._run_exitfuncs()
    os._exit(code)


def _run(args: argparse.Namespace) -> Any:
    """Run the command; for a fresh classify process, the worker to close before a fast exit (else None)."""
    if args.command == "classify":
        s, worker = _classify(args)
        rate = "none classified in this run" if s["images_per_second"] is None else f"{s['images_per_second']} images/s"
        print(f"{s['predicted']} predicted, {s['errors']} errors of {s['listed']} images, {rate} on {s['device']}")
        if s.get("skipped"):  # folder entries that are no image: said, so nothing in the input goes unmentioned
            from tasks.images.manifest import describe_skipped  # loaded by the run already

            print(f"{describe_skipped(s['skipped'])} in the input")
        print(f"model {s['model']['name']} v{s['model']['version']}; predictions: {s['output']}  "
              f"(errors in {s['output']}/_errors)")
        print(_startup_line(s))
        return worker
    elif args.command == "train":
        print(json.dumps(_flow_call("train", args), indent=2))
    elif args.command == "demo":
        r = _flow_call("demo", args)
        acc = r["accuracy"]
        print()
        print(f"test accuracy (from the Parquet): {acc['accuracy']:.2%} ({acc['correct']}/{acc['labelled']})")
        print(f"classify throughput:             {r['images_per_second']} images/s")
        print(f"model:                           {r['classified_with']} (alias production); trained {r['model']} at "
              f"{r['model_url']}")
        print(f"predictions:                     {r['output']}")
    elif args.command == "compress":
        cli_compress.run(args)
    elif args.command == "tune":
        cli_tune.run(args)
    else:
        cli_models.run(args)
    return None


def refusal_line(e: BaseException) -> str:
    """The one line a refusal prints: pydantic's and Prefect's parameter errors without their boilerplate, and a
    flow parameter named as the CLI spells it (`overwrite=True` is `--overwrite` here)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):
        from flows.params import one_line

        text = str(one_line(e))
    elif type(e).__name__ == "ParameterTypeError":  # "Flow run received invalid parameters:\n - name: message"
        text = "; ".join(line.strip().removeprefix("- ").replace("Value error, ", "")
                         for line in str(e).splitlines()[1:] if line.strip()) or str(e)
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:  # "[Errno 2] No such ...: 'x'"
        text = f"{e.filename!r}: {e.strerror.lower()}"
    else:
        text = str(e)
    text = re.sub(r"\b(overwrite|full)=True\b", r"--\1", text)  # the switches tasks' messages name
    return " ".join(text.split())  # one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # anywhere on the line, as users add it to the command that failed
    argv = [a for a in argv if a != "--debug"]
    args = _parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    args.debug = debug
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server's first start (database migrations) can outlast Prefect's 20 s default on a cold machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(int(SERVER_TIMEOUT_S)))
    # warnings of the plain functions (e.g. GPU out-of-memory back-off) show in the Prefect run's log
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
    signals.install()  # Ctrl-C and SIGTERM: out in seconds, the run marked Crashed, nothing left running
    quiet.install()  # one-line errors logged without their traceback
    try:
        with terminal_progress():  # quiet when stdout is not a terminal
            worker = _run(args)
    except signals.Interrupted as e:
        signals.exit_interrupted(e)
    except Exception as e:
        if not is_refusal(e):
            raise
        if debug:
            traceback.print_exc()
        print(f"a2k: error: {refusal_line(e)}", file=sys.stderr)
        return 2
    if worker is not None:
        _exit_now(0, worker)
    return 0
