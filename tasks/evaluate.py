"""Measure a classifier's predictions against the true labels, from the Parquet a classify run wrote."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as ds


def accuracy_from_predictions(output: str) -> dict[str, float | int]:
    """Top-1 accuracy over the rows that carry a true label, read back from the Parquet dataset."""
    table = ds.dataset(output, format="parquet").to_table(columns=["label", "true_label"])
    labelled = table.filter(pc.is_valid(table["true_label"]))
    correct = pc.sum(pc.equal(labelled["label"], labelled["true_label"])).as_py() or 0
    n = labelled.num_rows
    return {"rows": table.num_rows, "labelled": n, "correct": correct, "accuracy": correct / n if n else float("nan")}
