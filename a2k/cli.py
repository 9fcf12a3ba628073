"""The `a2k` command line: each command runs a Prefect flow or a registry verb."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from a2k import cli_compress, cli_models


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2k", description="GPU batch image classification to Parquet.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify a folder of images (or a .parquet manifest) into Parquet")
    c.add_argument("input", help="folder of images (recursive) or .parquet manifest with a 'uri' column")
    c.add_argument("output", help="folder for the Parquet dataset")
    c.add_argument("--model", required=True,
                   help="models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, NAME (= @production) or a folder")
    c.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: the largest that fits the free GPU memory, at most 256; 64 on CPU)")
    c.add_argument("--shard-size", type=int, default=4096)
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--num-threads", type=int, default=None, help="DALI CPU threads (default: the usable cores, at most 16)")
    c.add_argument("--hw-decoder-load", type=float, default=0.65, help="share of JPEGs for the hardware decoder")
    c.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="use at most this much GPU memory (e.g. 6 to run as an RTX A2000 6 GB); on OOM batches halve")
    c.add_argument("--overwrite", action="store_true", help="replace parts in OUTPUT left by another input or model")
    c.add_argument("--registry", default=None, help="registry folder or s3:// URL (default: $A2K_REGISTRY or $A2K_HOME/models)")
    c.add_argument("--full", action="store_true",
                   help="classify every image again (default: only images new or changed since the last run)")
    c.add_argument("--task-runner", default="local",
                   help="local: in this process; dask: on a Dask cluster (a temporary one, or --dask-address)")
    c.add_argument("--dask-address", default=None, help="scheduler of a running Dask cluster, e.g. tcp://host:8786")
    c.add_argument("--dask-workers", type=int, default=None, help="workers of the temporary local Dask cluster")

    t = sub.add_parser("train", help="train a classifier on <root>/<class>/<file> and register it")
    t.add_argument("dataset")
    t.add_argument("--arch", default="seed-cnn")
    t.add_argument("--name", required=True)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--learning-rate", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--test-fraction", type=float, default=0.15)
    t.add_argument("--flip-probability", type=float, default=0.5)
    t.add_argument("--image-size", type=int, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--num-threads", type=int, default=None)
    t.add_argument("--registry", default=None)

    d = sub.add_parser("demo", help="digits dataset -> train seed-cnn -> promote -> classify the test split")
    d.add_argument("--workdir", default=None, help="default: $A2K_HOME/demo")
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--device", default="auto")
    d.add_argument("--registry", default=None)

    cli_models.add_parsers(sub)
    cli_compress.add_parsers(sub)
    return p


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("command", "models_command", "json")}


def _run(args: argparse.Namespace) -> None:
    if args.command == "classify":
        from flows.classify_images import classify_images

        s = classify_images(**_kwargs(args))
        print(f"{s['predicted']} predicted, {s['errors']} errors of {s['listed']} images, "
              f"{s['images_per_second']} images/s on {s['device']}")
        print(f"model {s['model']['name']} v{s['model']['version']}; predictions: {s['output']}  "
              f"(errors in {s['output']}/_errors)")
    elif args.command == "train":
        from flows.train_model import train_model

        print(json.dumps(train_model(**_kwargs(args)), indent=2))
    elif args.command == "demo":
        from flows.demo import demo

        r = demo(**_kwargs(args))
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
    args = _parser().parse_args(argv)
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
