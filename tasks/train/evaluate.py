"""Measure a classifier's predictions against the true labels, from the Parquet a classify run wrote."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tasks.models.entry import check_class_names


def accuracy_from_predictions(output: str) -> dict[str, float | int]:
    """Top-1 accuracy over the rows that carry a true label, read back from the Parquet dataset."""
    table = ds.dataset(output, format="parquet").to_table(columns=["label", "true_label"])
    labelled = table.filter(pc.is_valid(table["true_label"]))
    correct = pc.sum(pc.equal(labelled["label"], labelled["true_label"])).as_py() or 0
    n = labelled.num_rows
    return {"rows": table.num_rows, "labelled": n, "correct": correct, "accuracy": correct / n if n else float("nan")}


# --- classification evaluation: top-1/top-5, per-class precision/recall, confusion matrix -------------------------

PREDICTION_COLUMNS = ("label", "topk_labels", "true_label")
TOP_K = 5
_NAMES_SHOWN = 20  # how many known classes an error message lists before it says "... (N in all)"
_CELL_NUMBERS_UP_TO = 30  # above this many classes the cells are too small to print counts in


@dataclass(frozen=True)
class ClassMetrics:
    """One class's precision and recall. A class never predicted has precision 0.0; one with no support, recall 0.0."""

    name: str
    precision: float
    recall: float
    support: int

    def __post_init__(self) -> None:
        for field in ("precision", "recall"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} of class {self.name!r} is {value}; allowed: 0.0 to 1.0")
        if self.support < 0:
            raise ValueError(f"support of class {self.name!r} is {self.support}; allowed: 0 or more")


@dataclass(frozen=True)
class Evaluation:
    """A classifier measured on labelled rows: top-1 and top-5 accuracy, per-class metrics, and the confusion matrix.

    `top5` counts a row when its true label is among the first min(5, k) of its `topk_labels`.
    `confusion[i][j]` counts rows whose true class is `class_names[i]` and whose top-1 prediction is `class_names[j]`.
    Per class, precision is 0.0 for a class that was never predicted and recall is 0.0 for a class with no support.
    """

    class_names: tuple[str, ...]
    images: int
    top1: float
    top5: float
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if [m.name for m in self.per_class] != list(self.class_names):
            raise ValueError(f"per_class names {[m.name for m in self.per_class]} do not match class_names "
                             f"{list(self.class_names)}")
        if len(self.confusion) != n or any(len(row) != n for row in self.confusion):
            raise ValueError(f"confusion is {len(self.confusion)} rows of lengths {[len(r) for r in self.confusion]}; "
                             f"it must be {n} x {n}, one row and one column per class")
        counted = sum(map(sum, self.confusion))
        if counted != self.images:
            raise ValueError(f"confusion counts {counted} rows but images is {self.images}; they must agree")
        for field in ("top1", "top5"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} is {value}; allowed: 0.0 to 1.0")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings only, so `json.dumps` takes it as is (e.g. into a registry's metrics)."""
        return {
            "class_names": list(self.class_names),
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": [asdict(m) for m in self.per_class],
            "confusion": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Evaluation:
        missing = [key for key in ("class_names", "images", "top1", "top5", "per_class", "confusion") if key not in doc]
        if missing:
            raise ValueError(f"evaluation dict lacks {missing}; it has {sorted(doc)}")
        return cls(
            class_names=tuple(doc["class_names"]),
            images=int(doc["images"]),
            top1=float(doc["top1"]),
            top5=float(doc["top5"]),
            per_class=tuple(ClassMetrics(m["name"], float(m["precision"]), float(m["recall"]), int(m["support"]))
                            for m in doc["per_class"]),
            confusion=tuple(tuple(int(c) for c in row) for row in doc["confusion"]),
        )


def evaluate_predictions(source: str | os.PathLike | pa.Table, class_names: Sequence[str]) -> Evaluation:
    """Evaluate a classify run's predictions (a Parquet folder or a table) over the rows that carry a true label.

    Raises ValueError when a true or predicted label is not in `class_names`, or when no row carries a true label.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # slow to import: only evaluating pays for it

    names = check_class_names(class_names)
    table, where = _read_predictions(source)
    labelled = table.filter(pc.is_valid(table["true_label"])).combine_chunks()
    if labelled.num_rows == 0:
        raise ValueError(f"no labelled rows in {where}: all {table.num_rows} rows have a null true_label; "
                         "evaluation needs rows with a true label")
    classes = range(len(names))
    true_idx = _class_indices(labelled["true_label"], names, "true label")
    pred_idx = _class_indices(labelled["label"], names, "predicted label")
    confusion = confusion_matrix(true_idx, pred_idx, labels=classes)
    precision, recall, _, support = precision_recall_fscore_support(true_idx, pred_idx, labels=classes,
                                                                    zero_division=0.0)
    images = labelled.num_rows
    return Evaluation(
        class_names=names,
        images=images,
        top1=float(np.trace(confusion) / images),
        top5=float(_topk_hits(labelled["topk_labels"], labelled["true_label"], TOP_K).sum() / images),
        per_class=tuple(ClassMetrics(name, float(p), float(r), int(s))
                        for name, p, r, s in zip(names, precision, recall, support)),
        confusion=tuple(tuple(int(c) for c in row) for row in confusion),
    )


def _read_predictions(source: str | os.PathLike | pa.Table) -> tuple[pa.Table, str]:
    if isinstance(source, pa.Table):
        table, where = source, "the table"
    elif isinstance(source, (str, os.PathLike)):
        dataset = ds.dataset(os.fspath(source), format="parquet")
        missing = [c for c in PREDICTION_COLUMNS if c not in dataset.schema.names]
        if missing:
            raise ValueError(f"{os.fspath(source)} lacks columns {missing}; it has {dataset.schema.names}")
        table, where = dataset.to_table(columns=list(PREDICTION_COLUMNS)), os.fspath(source)
    else:
        raise TypeError(f"source is a {type(source).__name__}; allowed: a Parquet folder path (str) or a pyarrow.Table")
    missing = [c for c in PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{where} lacks columns {missing}; it has {table.column_names}")
    return table, where


def _class_indices(labels: pa.ChunkedArray, names: tuple[str, ...], what: str) -> np.ndarray:
    """Each label's position in `names`; a label outside `names` (or null) is an error that names it."""
    index = pc.index_in(labels, value_set=pa.array(names, pa.string()))
    if index.null_count:
        unknown = pc.unique(pc.filter(labels, pc.is_null(index))).to_pylist()
        shown = ", ".join(names[:_NAMES_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _NAMES_SHOWN else "")
        raise ValueError(f"{what} {', '.join(map(repr, unknown[:5]))} not in the known classes; known: {shown}")
    return index.to_numpy(zero_copy_only=False).astype(np.int64)


def _topk_hits(topk: pa.ChunkedArray, truth: pa.ChunkedArray, k: int) -> np.ndarray:
    """Per row, whether `truth` is among the first min(k, len) entries of its `topk` list (the rows hold ranked
    labels, not scores, and may hold fewer than k: sklearn's top_k_accuracy_score takes a full score matrix)."""
    head = pc.list_slice(topk.combine_chunks(), 0, k)
    rows = pc.list_parent_indices(head)
    same = pc.fill_null(pc.equal(pc.list_flatten(head), pc.take(truth.combine_chunks(), rows)), False)
    hits = np.zeros(len(truth), dtype=bool)
    hits[rows.to_numpy()[same.to_numpy(zero_copy_only=False)]] = True
    return hits


def draw_confusion_matrix(evaluation: Evaluation, path: str | os.PathLike, title: str) -> Path:
    """Draw the confusion matrix (rows true, columns predicted) as a PNG; counts in the cells up to 30 classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"confusion matrix path {str(path)!r} must end in .png; the drawing is a PNG")
    n = len(evaluation.class_names)
    counts = np.asarray(evaluation.confusion)
    side = min(16.0, max(4.5, 2.5 + 0.27 * n))  # ~50 classes still get cells a quarter inch wide
    label_size = max(6.0, min(10.0, 200 / n))
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(counts, display_labels=list(evaluation.class_names)).plot(
        ax=ax, cmap="Blues", include_values=n <= _CELL_NUMBERS_UP_TO, values_format="d", colorbar=False,
        xticks_rotation=45 if n <= 10 else 90, text_kw={"fontsize": max(5.5, min(10.0, 150 / n))},
    )
    display.im_.set_clim(0, max(1, counts.max()))  # an empty cell is white, whatever the smallest count
    fig.colorbar(display.im_, ax=ax, shrink=0.8).ax.tick_params(labelsize=label_size)
    ax.tick_params(labelsize=label_size)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right" if n <= 10 else "center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{evaluation.images} images, top-1 {evaluation.top1:.3f}, top-5 {evaluation.top5:.3f}",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def evaluation_table(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: one per class, then "all" with top-1/top-5; every row has the same keys."""
    rows: list[dict[str, Any]] = [
        {"class": m.name, "precision": round(m.precision, 4), "recall": round(m.recall, 4), "support": m.support,
         "top1": None, "top5": None}
        for m in evaluation.per_class
    ]
    rows.append({"class": "all", "precision": None, "recall": None, "support": evaluation.images,
                 "top1": round(evaluation.top1, 4), "top5": round(evaluation.top5, 4)})
    return rows
