"""What a classify run's summary shows a reviewer beside its counts, read back from the committed dataset: the label
counts, a histogram of top-1 scores with the least confident images (what a reviewer checks first), and, when the
folder layout gave true labels, the accuracy and a confusion matrix drawn as the evaluate flow draws it."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tasks.classify.output import Output

TOP_LABELS = 20  # label rows shown; the rest are summed in one row
SCORE_BINS = 10  # histogram bins over [0, 1]
LOWEST_SHOWN = 10  # least confident images listed
MATRIX_UP_TO = 50  # classes (true or predicted) up to which the confusion matrix is drawn
_BAR = 30  # characters of the longest histogram bar
_COLUMNS = ["image_uri", "label", "score", "topk_labels", "true_label"]


@dataclass(frozen=True)
class PredictionReport:
    """The dataset's predictions summed up. `accuracy` is over the rows whose true label is a class of the model
    (`labelled`); `unknown_truth` counts rows whose true label (a folder name) is not one."""

    rows: int
    label_counts: tuple[tuple[str, int], ...]  # the TOP_LABELS most predicted, most first
    other_labels: int
    other_rows: int
    score_edges: tuple[float, ...]
    score_counts: tuple[int, ...]
    lowest: tuple[tuple[str, str, float], ...]  # (image_uri, label, score), least confident first
    labelled: int = 0
    accuracy: float | None = None
    unknown_truth: int = 0
    confusion_png: bytes | None = None
    matrix_note: str = ""


def read_predictions(out: Output, parts: Sequence[str]) -> pa.Table:
    """The columns the report needs from the committed parts `parts` of `out` (local or S3)."""
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in ("image_uri", "label", "true_label")} |
                        {"score": pa.array([], pa.float32()), "topk_labels": pa.array([], pa.list_(pa.string()))})
    dataset = ds.dataset([out.part(p) for p in parts], filesystem=out.fs, format="parquet")
    return dataset.to_table(columns=_COLUMNS)


def prediction_report(table: pa.Table, class_names: Sequence[str], title: str) -> PredictionReport:
    """Sum up `table` (a classify dataset's rows) for a model of `class_names`; `title` heads the matrix."""
    counts = sorted(pc.value_counts(table["label"]).to_pylist(), key=lambda c: (-c["counts"], str(c["values"])))
    shown = tuple((str(c["values"]), int(c["counts"])) for c in counts[:TOP_LABELS])
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    hist, edges = np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))
    k = min(LOWEST_SHOWN, len(scores))
    order = np.argpartition(scores, k - 1)[:k] if k else np.zeros(0, np.int64)  # no full sort of a large dataset
    order = order[np.argsort(scores[order], kind="stable")]
    low = table.select(["image_uri", "label", "score"]).take(pa.array(order, pa.int64())).to_pylist()
    report = PredictionReport(
        rows=table.num_rows, label_counts=shown, other_labels=max(0, len(counts) - TOP_LABELS),
        other_rows=sum(int(c["counts"]) for c in counts[TOP_LABELS:]),
        score_edges=tuple(float(e) for e in edges), score_counts=tuple(int(h) for h in hist),
        lowest=tuple((r["image_uri"], r["label"], float(r["score"])) for r in low),
    )
    truth = table.select(["label", "topk_labels", "true_label"]).filter(pc.is_valid(table["true_label"]))
    if truth.num_rows == 0:
        return report
    known = truth.filter(pc.is_in(truth["true_label"], value_set=pa.array(list(class_names), pa.string())))
    return _with_truth(report, known, truth.num_rows - known.num_rows, title)


def _with_truth(report: PredictionReport, known: pa.Table, unknown: int, title: str) -> PredictionReport:
    from dataclasses import replace

    from tasks.train.evaluate import draw_confusion_matrix, evaluate_predictions

    if known.num_rows == 0:
        return replace(report, unknown_truth=unknown, matrix_note="no true label (folder name) is a class of the model")
    correct = pc.sum(pc.equal(known["label"], known["true_label"])).as_py() or 0
    report = replace(report, labelled=known.num_rows, accuracy=correct / known.num_rows, unknown_truth=unknown)
    present = sorted(set(pc.unique(known["true_label"]).to_pylist()) | set(pc.unique(known["label"]).to_pylist()))
    if len(present) > MATRIX_UP_TO:
        return replace(report, matrix_note=f"{len(present)} classes occur: the confusion matrix is drawn up to "
                                           f"{MATRIX_UP_TO}; `a2k evaluate` measures per-class precision and recall")
    if len(present) < 2:
        return replace(report, matrix_note=f"every labelled image is {present[0]!r}, true and predicted")
    evaluation = evaluate_predictions(known, present)
    with tempfile.TemporaryDirectory() as tmp:
        png = draw_confusion_matrix(evaluation, Path(tmp) / "confusion.png", title=title).read_bytes()
    return replace(report, confusion_png=png)


def report_markdown(report: PredictionReport) -> str:
    """The report as Markdown: tables with bars, and the confusion matrix inline (a PNG data URI)."""
    lines = ["", f"## Predicted labels (top {TOP_LABELS}, over the dataset's {report.rows} rows)", "",
             "| label | images | share |", "|---|---:|---:|"]
    share = (lambda n: f"{n / report.rows:.1%}") if report.rows else (lambda n: "-")
    lines += [f"| {_cell(label)} | {n} | {share(n)} |" for label, n in report.label_counts]
    if report.other_labels:
        lines.append(f"| *{report.other_labels} other labels* | {report.other_rows} | {share(report.other_rows)} |")
    top = max(report.score_counts, default=0) or 1
    lines += ["", "## Top-1 scores", "", "| score | images | |", "|---|---:|---|"]
    edges = report.score_edges
    lines += [f"| {edges[i]:.1f}-{edges[i + 1]:.1f} | {n} | {'█' * round(_BAR * n / top)} |"
              for i, n in enumerate(report.score_counts)]
    if report.lowest:
        lines += ["", f"Least confident {len(report.lowest)} (review first):", "", "| image | label | score |",
                  "|---|---|---:|"]
        lines += [f"| `{_cell(uri)}` | {_cell(label)} | {score:.3f} |" for uri, label, score in report.lowest]
    if report.accuracy is not None or report.unknown_truth:
        lines += ["", "## Against the true labels (folder names)", ""]
        if report.accuracy is not None:
            lines.append(f"accuracy **{report.accuracy:.4f}** over {report.labelled} labelled images")
        if report.unknown_truth:
            lines.append(f"{report.unknown_truth} images have a true label that is not a class of the model "
                         "(not counted)")
        if report.matrix_note:
            lines.append(report.matrix_note)
        if report.confusion_png:
            encoded = base64.b64encode(report.confusion_png).decode("ascii")
            lines += ["", f"![confusion matrix](data:image/png;base64,{encoded})"]
    return "\n".join(lines) + "\n"


def _cell(text: str | None) -> str:
    """A value in a Markdown table cell: its pipes escaped, its line breaks as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")
