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
                   help="check the recipes are supported there and the child fits its memory at --batch-size; on a "
                        "bigger CUDA card, time parent and child on the target's share of its SMs")
    c.add_argument("--max-accuracy-drop", type=float, default=1.0, help="top-1 points the child may lose (default 1.0)")
    c.add_argument("--min-speedup", type=float, default=1.2,
                   help="how many times the parent's images/s the child must reach, measured through the executor "
                        "(default 1.2; 0: speed not required)")
    c.add_argument("--alias", default="candidate", help="alias moved to the child when it passes (default candidate)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--num-threads", type=int, default=None)
    c.add_argument("--registry", default=None, help="folder or s3:// URL (default: $A2K_REGISTRY or $A2K_HOME/models)")
    c.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> None:
    from flows.compress_model import compress_model
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
