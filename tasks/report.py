"""Close a classify run: check that every listed image is accounted for, write the commit marker, report."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from tasks.classify import RunContext, ShardOutcome
from tasks.sink import ERRORS_DIR, read_part_rows, write_run_marker


def resumed_outcome(output: str, index: int, part: str) -> ShardOutcome:
    """The counts of a shard committed by an earlier run, read from its parts' footers."""
    return ShardOutcome(
        index=index,
        part=part,
        predicted=read_part_rows(output, part),
        errors=read_part_rows(output, part, subdir=ERRORS_DIR),
        decode_infer_seconds=0.0,
        write_seconds=0.0,
        resumed=True,
    )


def commit_run(
    output: str, listed: int, outcomes: list[ShardOutcome], ctx: RunContext, stage_seconds: dict[str, float], extra: dict[str, Any]
) -> dict[str, Any]:
    """Check listed == predicted + errors, then write the marker; a mismatch fails the run loudly."""
    predicted = sum(o.predicted for o in outcomes)
    errors = sum(o.errors for o in outcomes)
    if predicted + errors != listed:
        raise RuntimeError(
            f"{listed} images listed but {predicted} predicted + {errors} errors = {predicted + errors}: "
            "the output is incomplete; no commit marker written"
        )
    processed = sum(o.predicted + o.errors for o in outcomes if not o.resumed)
    busy = stage_seconds.get("decode_infer", 0.0) + stage_seconds.get("write", 0.0)
    summary = {
        "status": "committed",
        "run_id": ctx.run_id,
        "model": {"name": ctx.model_name, "version": ctx.model_version, "sha256": ctx.model_sha256},
        "top_k": ctx.top_k,
        "listed": listed,
        "predicted": predicted,
        "errors": errors,
        "processed_this_run": processed,
        "resumed_shards": sum(o.resumed for o in outcomes),
        "images_per_second": round(processed / busy, 1) if busy > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "parts": sorted(o.part for o in outcomes),
        **extra,
    }
    summary["marker"] = write_run_marker(output, summary)
    return summary


def accuracy_from_predictions(output: str) -> dict[str, float | int]:
    """Top-1 accuracy over the rows that carry a true label, read back from the Parquet dataset."""
    table = ds.dataset(output, format="parquet").to_table(columns=["label", "true_label"])
    labelled = table.filter(pc.is_valid(table["true_label"]))
    correct = pc.sum(pc.equal(labelled["label"], labelled["true_label"])).as_py() or 0
    n = labelled.num_rows
    return {"rows": table.num_rows, "labelled": n, "correct": correct, "accuracy": correct / n if n else float("nan")}


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["model"]
    secs = summary["stage_seconds"]
    lines = [
        "# classify-images",
        "",
        "| | |",
        "|---|---|",
        f"| output | `{summary['output']}` |",
        f"| model | {m['name']} v{m['version']} (`{m['sha256'][:12]}`) |",
        f"| device | {summary['device']} |",
        f"| images listed | {summary['listed']} |",
        f"| predicted | {summary['predicted']} |",
        f"| errors | {summary['errors']} (in `{ERRORS_DIR}/`) |",
        f"| processed this run | {summary['processed_this_run']} ({summary['resumed_shards']} shards already committed) |",
        f"| images/s (decode+infer+write) | {summary['images_per_second']} |",
    ]
    lines += [f"| seconds: {k} | {v} |" for k, v in secs.items()]
    return "\n".join(lines) + "\n"


def outcome_dict(o: ShardOutcome) -> dict[str, Any]:
    return asdict(o)
