"""The `a2k` command line: each command runs a Prefect flow or a registry verb."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from a2k import cli_compress, cli_models
from a2k.cli_flows import add_flow_arguments, check_flow_arguments, flow_arguments


def _parser(command: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2k", description="GPU batch image classification to Parquet.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify a folder of images (or a .parquet manifest) into Parquet")
    if command == "classify":  # the flow's signature, imported only when its command runs
        from flows.classify_images import classify_images

        add_flow_arguments(c, classify_images.fn, positional=("input", "output"))

    t = sub.add_parser("train", help="train a classifier on <root>/<class>/<file> and register it")
    if command == "train":
        from flows.train_model import train_model

        add_flow_arguments(t, train_model.fn, positional=("dataset",))

    d = sub.add_parser("demo", help="digits dataset -> train seed-cnn -> promote -> classify the test split")
    if command == "demo":
        from flows.demo import demo

        add_flow_arguments(d, demo.fn)

    cli_models.add_parsers(sub)
    cli_compress.add_parsers(sub)
    return p


def _flow_call(flow: Any, args: argparse.Namespace, checks: dict[str, Any] | None = None) -> Any:
    """Run `flow` with the command's arguments, checked against its signature (and `checks`) before any Prefect
    work."""
    return flow(**check_flow_arguments(flow.fn, flow_arguments(args, flow.fn), checks))


def _run(args: argparse.Namespace) -> None:
    if args.command == "classify":
        from flows.classify_images import classify_images
        from flows.params import check_input_source, check_output_target

        s = _flow_call(classify_images, args, {"input": check_input_source, "output": check_output_target})
        print(f"{s['predicted']} predicted, {s['errors']} errors of {s['listed']} images, "
              f"{s['images_per_second']} images/s on {s['device']}")
        print(f"model {s['model']['name']} v{s['model']['version']}; predictions: {s['output']}  "
              f"(errors in {s['output']}/_errors)")
    elif args.command == "train":
        from flows.train_model import train_model

        print(json.dumps(_flow_call(train_model, args), indent=2))
    elif args.command == "demo":
        from flows.demo import demo

        r = _flow_call(demo, args)
        acc = r["accuracy"]
        print()
        print(f"test accuracy (from the Parquet): {acc['accuracy']:.2%} ({acc['correct']}/{acc['labelled']})")
        print(f"classify throughput:             {r['images_per_second']} images/s")
        print(f"model:                           {r['model']} (alias production) at {r['model_url']}")
        print(f"predictions:                     {r['output']}")
    elif args.command == "compress":
        cli_compress.run(args)
    else:
        cli_models.run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server's first start (database migrations) can outlast Prefect's 20 s default on a cold machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # warnings of the plain functions (e.g. GPU out-of-memory back-off) show in the Prefect run's log
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
    from prefect.exceptions import ParameterTypeError
    from pydantic import ValidationError

    try:
        _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ParameterTypeError, ValidationError) as e:
        print(f"a2k: error: {e}", file=sys.stderr)
        return 2
    return 0
