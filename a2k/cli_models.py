"""`a2k models ...` and `a2k evaluate`: the registry from the command line, for people and (--json) scripts."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from a2k.cli_flows import FlowSpec

EVALUATE = FlowSpec("flows.evaluate_model", "evaluate_model")
_IMPORT_FILES = {"source": "a .safetensors or .pth state dict, a TorchScript file or a torch.export .pt2",
                 "labels file": "a file of class names, one per line (or a JSON list)"}


_REF_HELP = "models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest or NAME (= @production)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="the model registry: list, show, import, promote, rollback, archive")
    msub = m.add_subparsers(dest="models_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="folder or s3:// URL (default: $A2K_REGISTRY or $A2K_HOME/models)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    ls = msub.add_parser("list", parents=[common], help="every version, with status and aliases")
    ls.add_argument("--name", default=None, help="only this model's versions (unset: every model)")
    show = msub.add_parser("show", parents=[common], help="one version: entry, metrics, lineage to the root")
    show.add_argument("ref", help=_REF_HELP)

    imp = msub.add_parser("import", parents=[common], help="register an existing classifier")
    imp.add_argument("source", help=".safetensors or .pth state dict, TorchScript file, or torch.export .pt2")
    imp.add_argument("--name", required=True, help="the name to register it under (its next version)")
    imp.add_argument("--labels", default=None, help="file of class names, one per line (or a JSON list); optional "
                     "when --arch names torchvision weights (their categories)")
    imp.add_argument("--arch", default=None, help="architecture of a state dict: a built-in one, any torchvision "
                     "classification model (resnet18), timm:NAME, or NAME:WEIGHTS (resnet50:IMAGENET1K_V2) for the "
                     "preprocessing and class names those weights record (unset: a TorchScript or torch.export file "
                     "carries its own)")
    unset = " (unset: from --arch, else ImageNet's 256/224, mean/std, bilinear, 3 channels)"
    imp.add_argument("--resize", type=int, default=None, help="side the image is resized to before the crop, in "
                     "pixels" + unset)
    imp.add_argument("--crop", type=int, default=None, help="side of the center crop the model sees, in pixels" + unset)
    imp.add_argument("--mean", type=float, nargs="+", default=None,
                     help="per-channel mean subtracted from pixels scaled to 0-1" + unset)
    imp.add_argument("--std", type=float, nargs="+", default=None,
                     help="per-channel standard deviation the pixels are divided by" + unset)
    imp.add_argument("--interpolation", default=None, choices=["nearest", "bilinear", "bicubic"],
                     help="how the image is resized" + unset)
    imp.add_argument("--channels", type=int, default=None, choices=[1, 3],
                     help="input channels: 1 (gray) or 3 (RGB)" + unset)

    promote = msub.add_parser("promote", parents=[common], help="point an alias at a version")
    promote.add_argument("ref", help=_REF_HELP)
    promote.add_argument("--alias", default="production", help="the alias to point at the version")
    rollback = msub.add_parser("rollback", parents=[common], help="move an alias back to its previous version")
    rollback.add_argument("name", help="the model's name")
    rollback.add_argument("--alias", default="production", help="the alias to move back")
    arch = msub.add_parser("archive", parents=[common], help="retire a version")
    arch.add_argument("ref", help=_REF_HELP)
    arch.add_argument("--reason", default="", help="why, kept with the version (unset: none given)")

    ev = sub.add_parser("evaluate", parents=[common], help="top-1/top-5, per-class precision/recall, confusion matrix")
    ev.add_argument("ref", help=_REF_HELP)
    ev.add_argument("dataset", nargs="?", default=None, help="labelled folder <root>/<class>/<file>; default: the "
                    "version's recorded test split")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--batch-size", type=int, default=256, help="images per GPU/CPU batch")


def _print(doc: Any, as_json: bool, text: str) -> None:
    print(json.dumps(doc, indent=2, default=str) if as_json else text)


def _version_line(v, aliases_width: int = 18) -> str:
    e = v.entry
    acc = e.metrics.get("test_accuracy", e.metrics.get("top1"))
    acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"
    return (f"{e.name:<20} {e.version:>4}  {v.status.value:<9} {','.join(v.aliases) or '-':<{aliases_width}} "
            f"{e.architecture:<18} {e.weights_bytes / 1e6:>8.2f} MB  {acc_text:>8}  {e.created_at}")


def version_table(versions: list) -> str:
    """The versions as a table whose ALIASES column is as wide as its longest cell (several aliases included)."""
    width = max([len("ALIASES"), 18, *(len(",".join(v.aliases)) for v in versions)])
    header = (f"{'NAME':<20} {'VER':>4}  {'STATUS':<9} {'ALIASES':<{width}} {'ARCH':<18} {'SIZE':>11}  "
              f"{'TEST ACC':>8}  CREATED")
    return "\n".join([header, *(_version_line(v, width) for v in versions)])


def _check_evaluate(args: argparse.Namespace) -> None:
    from a2k.cli_flows import check_flow_arguments
    from flows.params import check_input_source, check_model_spec

    values = {"model": args.ref, "dataset": args.dataset, "device": args.device, "batch_size": args.batch_size,
              "registry": args.registry}
    checked = check_flow_arguments(EVALUATE, values, {"dataset": lambda v: v if v is None else check_input_source(v)})
    args.dataset = checked["dataset"]
    check_model_spec(args.ref, args.registry)


def _check_import(args: argparse.Namespace) -> None:
    for what, path in (("source", args.source), ("labels file", args.labels)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{what} {path!r} is not a file; give {_IMPORT_FILES[what]}")
    from tasks.models.card import check_model_name

    check_model_name(args.name)


def run(args: argparse.Namespace) -> None:
    if args.command == "evaluate":
        _check_evaluate(args)  # before Prefect and its server: a bad value is refused in one line, at once
        from flows.evaluate_model import evaluate_model
        from a2k.cli_logs import quiet_refusals

        quiet_refusals(args.debug)

        result = evaluate_model(model=args.ref, dataset=args.dataset, device=args.device, batch_size=args.batch_size,
                                registry=args.registry)
        _print(result, args.json, "\n".join(f"{k}: {v}" for k, v in result.items() if k != "per_class"))
        return
    if args.models_command == "import":
        _check_import(args)  # its files before torch is loaded
    from tasks.models import registry as reg  # torch, through the model entry

    cmd = args.models_command
    if cmd == "list":
        versions = reg.list_models(args.registry, args.name)
        _print([v.to_dict() for v in versions], args.json, version_table(versions))
    elif cmd == "show":
        chain = reg.lineage(args.ref, args.registry)
        head = chain[0]
        history = {a: reg.alias_history(head.entry.name, a, args.registry) for a in head.aliases}
        evaluations = reg.list_evaluations(head, args.registry)
        text = [_version_line(head), f"  url: {head.url}", f"  sha256: {head.entry.weights_sha256}",
                f"  status: {head.status.value} {head.status_reason}".rstrip(),
                f"  preprocessing: {head.entry.preprocessing.to_dict()}", f"  metrics: {head.entry.metrics}",
                "  lineage: " + " <- ".join(f"{c.ref} ({c.entry.lineage.get('recipe', '?')})" for c in chain)]
        for alias, moves in history.items():
            text.append(f"  alias {alias}: " + " -> ".join(str(m.get("version", "deleted")) for m in moves))
        for ev in evaluations:
            text.append(f"  evaluation {ev['at']}: top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f} on {ev['images']} "
                        f"images of {ev['dataset']}")
        _print({**head.to_dict(), "lineage_chain": [str(c.ref) for c in chain], "alias_history": history,
                "evaluations": evaluations}, args.json, "\n".join(text))
    elif cmd == "import":
        from flows.import_model import import_model
        from a2k.cli_logs import quiet_refusals

        quiet_refusals(args.debug)

        result = import_model(source=args.source, name=args.name, labels=args.labels, arch=args.arch,
                              resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
                              interpolation=args.interpolation, channels=args.channels, registry=args.registry)
        _print(result, args.json, f"registered {result['ref']} at {result['url']}")
    elif cmd == "promote":
        ref = reg.as_model_ref(args.ref)
        target = reg.get_model(ref, args.registry)
        info = reg.set_alias(ref.name, args.alias, int(target.entry.version), args.registry)
        _print(info.to_dict(), args.json, f"{ref.name}@{args.alias} -> version {info.entry.version}")
    elif cmd == "rollback":
        info = reg.rollback_alias(args.name, args.alias, args.registry)
        _print(info.to_dict(), args.json, f"{args.name}@{args.alias} -> version {info.entry.version} (rolled back)")
    elif cmd == "archive":
        ref = reg.as_model_ref(args.ref)
        target = reg.get_model(ref, args.registry)
        info = reg.archive(ref.name, int(target.entry.version), args.reason, args.registry)
        _print(info.to_dict(), args.json, f"{info.ref} archived")
