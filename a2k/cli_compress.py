"""`a2k compress`: run the compress-model flow and print parent and child side by side."""

from __future__ import annotations

import argparse
import json

from tasks.compress.recipes import RECIPES, allowed_recipes
from tasks.targets import TARGETS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compress", help=f"compress a registered model ({', '.join(RECIPES)}), gated on its measured "
                                        "accuracy")
    c.add_argument("ref", help="models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest or NAME (= @production)")
    c.add_argument("--recipe", action="append", required=True, dest="recipes", metavar="RECIPE",
                   help=f"repeat to chain, in this order: {allowed_recipes()}")
    c.add_argument("--target", default=None, choices=sorted(TARGETS),
                   help="a card to compress for (unset: none): check the recipes are supported there and the child "
                        "fits its memory at --batch-size; on a "
                        "bigger CUDA card, time parent and child on the target's share of its SMs")
    c.add_argument("--max-accuracy-drop", type=float, default=1.0, help="top-1 points the child may lose")
    c.add_argument("--min-speedup", type=float, default=1.2,
                   help="how many times the parent's images/s the child must reach, measured through the executor "
                        "(0: speed not required)")
    c.add_argument("--alias", default="candidate", help="alias moved to the child when it passes")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--batch-size", type=int, default=256, help="images per GPU/CPU batch")
    c.add_argument("--num-threads", type=int, default=None,
                   help="DALI CPU threads (unset: the usable cores, at most 16)")
    c.add_argument("--registry", default=None, help="folder or s3:// URL (default: $A2K_REGISTRY or $A2K_HOME/models)")
    c.add_argument("--json", action="store_true", help="print JSON for scripts")


def _check_alias(v: str) -> str:
    from tasks.models.registry import check_alias  # torch, through the model entry: after the cheap checks

    return check_alias(v)


def _check(args: argparse.Namespace) -> None:
    """The run's arguments checked before Prefect and its server: a bad one is refused in one line, at once."""
    from a2k.cli_flows import FlowSpec, check_flow_arguments  # pydantic: loaded where the arguments are checked
    from flows.params import check_model_spec
    from tasks.compress.recipes import parse_chain

    values = {"model": args.ref, "recipes": args.recipes, "target": args.target,
              "max_accuracy_drop": args.max_accuracy_drop, "min_speedup": args.min_speedup, "device": args.device,
              "batch_size": args.batch_size, "num_threads": args.num_threads, "alias": args.alias,
              "registry": args.registry}
    check_flow_arguments(FlowSpec("flows.compress_model", "compress_model"), values, {"recipes": parse_chain, "alias": _check_alias})
    check_model_spec(args.ref, args.registry)


def run(args: argparse.Namespace) -> None:
    _check(args)
    from flows.compress_model import compress_model
    from a2k.cli_logs import quiet_refusals

    quiet_refusals(args.debug)
    from tasks.compress.measure import format_table

    result = compress_model(model=args.ref, recipes=args.recipes, target=args.target,
                            max_accuracy_drop=args.max_accuracy_drop, min_speedup=args.min_speedup,
                            device=args.device, batch_size=args.batch_size,
                            num_threads=args.num_threads, alias=args.alias, registry=args.registry)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    verdict = (f"PASSED: {result['child']} is now {result['alias']}" if result["passed"] else
               f"REJECTED: {result['child']} registered with status rejected")
    print(f"{result['parent']} -> {result['child']} ({' -> '.join(result['recipes'])}) on {result['device']}")
    print(format_table(result["comparison"]))
    print(f"speed measured through the executor {result['measured']}: x{result['speedup']:.2f} the parent's images/s")
    print(f"{verdict} ({result['reason']})")
