import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tasks.train.evaluate import (
    ClassMetrics, Evaluation, accuracy_from_predictions, draw_confusion_matrix, evaluate_predictions, evaluation_table,
)

CLASSES = ("cat", "dog", "fish")

# (true_label, label, topk_labels): k = 2, so "top-5" means within the first 2.
HAND_ROWS = [
    ("cat", "cat", ["cat", "dog"]),    # top-1 hit
    ("cat", "dog", ["dog", "cat"]),    # top-2 hit
    ("cat", "cat", ["cat", "fish"]),   # top-1 hit
    ("dog", "dog", ["dog", "cat"]),    # top-1 hit
    ("dog", "cat", ["cat", "fish"]),   # miss
    ("dog", "dog", ["dog", "fish"]),   # top-1 hit
    ("fish", "dog", ["dog", "fish"]),  # top-2 hit
    ("fish", "cat", ["cat", "dog"]),   # miss
    (None, "fish", ["fish", "cat"]),   # no true label: ignored, so fish stays never predicted
]


def _table(rows) -> pa.Table:
    true, label, topk = zip(*rows) if rows else ((), (), ())
    return pa.table({
        "image_uri": pa.array([f"/img/{i}.jpg" for i in range(len(rows))], pa.string()),
        "label": pa.array(label, pa.string()),
        "topk_labels": pa.array(topk, pa.list_(pa.string())),
        "true_label": pa.array(true, pa.string()),
    })


@pytest.fixture
def hand_folder(tmp_path):
    """The hand example as a Parquet folder of two parts, the way a classify run writes shards."""
    folder = tmp_path / "predictions"
    folder.mkdir()
    table = _table(HAND_ROWS)
    pq.write_table(table.slice(0, 4), folder / "part-0.parquet")
    pq.write_table(table.slice(4), folder / "part-1.parquet")
    return folder


def test_hand_computed_example_from_a_parquet_folder(hand_folder):
    ev = evaluate_predictions(str(hand_folder), CLASSES)
    # 8 labelled rows; top-1 right on rows 1, 3, 4, 6 -> 4/8; truth within the first 2 on all but rows 5 and 8 -> 6/8.
    assert ev.class_names == CLASSES
    assert ev.images == 8
    assert ev.top1 == 0.5
    assert ev.top5 == 0.75
    # rows true cat/dog/fish, columns predicted cat/dog/fish
    assert ev.confusion == ((2, 1, 0), (1, 2, 0), (1, 1, 0))
    # cat: 2 right of 4 predicted, 2 of 3 true; dog: the same; fish: never predicted -> precision 0.0, 0 of 2 found.
    assert [m.name for m in ev.per_class] == list(CLASSES)
    assert [m.precision for m in ev.per_class] == [0.5, 0.5, 0.0]
    assert [m.recall for m in ev.per_class] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert [m.support for m in ev.per_class] == [3, 3, 2]


def test_top1_agrees_with_accuracy_from_predictions(hand_folder):
    old = accuracy_from_predictions(str(hand_folder))
    assert (old["labelled"], old["accuracy"]) == (8, 0.5)
    assert evaluate_predictions(hand_folder, CLASSES).top1 == old["accuracy"]


def test_class_without_support_has_recall_zero():
    ev = evaluate_predictions(_table([("cat", "bird", ["bird"]), ("cat", "cat", ["cat"])]), ("bird", "cat"))
    assert ev.per_class == (ClassMetrics("bird", 0.0, 0.0, 0), ClassMetrics("cat", 1.0, 0.5, 2))
    assert ev.confusion == ((0, 0), (1, 1))


def test_matches_sklearn_on_a_random_table():
    rng = np.random.default_rng(0)
    names = tuple(f"class_{i}" for i in range(7))
    rows = []
    for _ in range(500):
        topk = [names[i] for i in rng.permutation(len(names))[:5]]
        true = names[rng.integers(len(names))] if rng.random() > 0.1 else None
        rows.append((true, topk[0], topk))
    ev = evaluate_predictions(_table(rows), names)

    labelled = [r for r in rows if r[0] is not None]
    y_true, y_pred = [r[0] for r in labelled], [r[1] for r in labelled]
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=list(names), zero_division=0)
    assert ev.images == len(labelled)
    np.testing.assert_allclose([m.precision for m in ev.per_class], precision)
    np.testing.assert_allclose([m.recall for m in ev.per_class], recall)
    assert [m.support for m in ev.per_class] == support.tolist()
    assert np.array_equal(ev.confusion, confusion_matrix(y_true, y_pred, labels=list(names)))
    assert ev.top1 == pytest.approx(np.mean(np.equal(y_true, y_pred)))
    assert ev.top5 == pytest.approx(np.mean([t in topk for t, _, topk in labelled]))


def test_top5_counts_the_first_five_only():
    names = tuple("abcdefghij")
    # truth at rank 1, 5 (counted) and 6, 10 (not counted), and a k=3 list with truth at rank 3 (counted: min(5, 3)).
    rows = [(names[rank - 1], names[0] if rank != 1 else names[1], list(names)) for rank in (1, 5, 6, 10)]
    rows.append(("c", "a", ["a", "b", "c"]))
    rows.append(("j", "a", ["a", "b", "c"]))
    ev = evaluate_predictions(_table(rows), names)
    assert ev.top5 == pytest.approx(3 / 6)
    assert ev.top1 == 0.0


@pytest.mark.parametrize("rows, class_names, message", [
    ([("zebra", "cat", ["cat"])], CLASSES, r"true label 'zebra' not in the known classes; known: cat, dog, fish"),
    ([("cat", "zebra", ["zebra"])], CLASSES, r"predicted label 'zebra' not in the known classes; known: cat, dog"),
    ([(None, "cat", ["cat"]), (None, "dog", ["dog"])], CLASSES, r"no labelled rows .* all 2 rows have a null"),
    ([], CLASSES, r"no labelled rows .* all 0 rows"),
    ([("cat", "cat", ["cat"])], ("cat", "dog", "cat"), r"class_names repeats \['cat'\]"),
    ([("cat", "cat", ["cat"])], (), r"class_names is empty"),
    ([("cat", "cat", ["cat"])], "cat", r"class_names is the string 'cat'"),
])
def test_bad_input_is_refused(rows, class_names, message):
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(_table(rows), class_names)


def test_long_class_lists_are_shortened_in_errors():
    names = tuple(f"c{i}" for i in range(100))
    with pytest.raises(ValueError, match=r"true label 'zebra' .* c19, \.\.\. \(100 in all\)$"):
        evaluate_predictions(_table([("zebra", "c0", ["c0"])]), names)


def test_missing_columns_are_named(tmp_path):
    pq.write_table(pa.table({"image_uri": ["a"], "label": ["cat"]}), tmp_path / "part-0.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['topk_labels', 'true_label'\]"):
        evaluate_predictions(str(tmp_path), CLASSES)
    with pytest.raises(TypeError, match="source is a list"):
        evaluate_predictions([1, 2], CLASSES)


def test_dict_round_trip_through_json(hand_folder):
    ev = evaluate_predictions(hand_folder, CLASSES)
    doc = json.loads(json.dumps(ev.to_dict()))
    assert doc["confusion"] == [[2, 1, 0], [1, 2, 0], [1, 1, 0]]
    assert Evaluation.from_dict(doc) == ev


def test_from_dict_refuses_inconsistent_documents(hand_folder):
    doc = evaluate_predictions(hand_folder, CLASSES).to_dict()
    with pytest.raises(ValueError, match="confusion counts 8 rows but images is 9"):
        Evaluation.from_dict({**doc, "images": 9})
    with pytest.raises(ValueError, match="it must be 3 x 3"):
        Evaluation.from_dict({**doc, "confusion": doc["confusion"][:2]})
    with pytest.raises(ValueError, match=r"lacks \['top5'\]"):
        Evaluation.from_dict({k: v for k, v in doc.items() if k != "top5"})


def test_evaluation_table_has_a_row_per_class_and_an_all_row(hand_folder):
    rows = evaluation_table(evaluate_predictions(hand_folder, CLASSES))
    assert [r["class"] for r in rows] == ["cat", "dog", "fish", "all"]
    assert rows[0] == {"class": "cat", "precision": 0.5, "recall": 0.6667, "support": 3, "top1": None, "top5": None}
    assert rows[-1] == {"class": "all", "precision": None, "recall": None, "support": 8, "top1": 0.5, "top5": 0.75}
    assert len({tuple(r) for r in rows}) == 1  # same keys in every row, so the artifact's columns line up


@pytest.mark.parametrize("n_classes", [3, 40])
def test_confusion_matrix_png(tmp_path, n_classes):
    rng = np.random.default_rng(n_classes)
    names = tuple(f"class_{i:02d}" for i in range(n_classes))
    rows = [(names[t], names[p], [names[p]]) for t, p in rng.integers(n_classes, size=(200, 2))]
    ev = evaluate_predictions(_table(rows), names)
    path = draw_confusion_matrix(ev, tmp_path / "plots" / "confusion.png", title=f"{n_classes} classes")
    assert path == tmp_path / "plots" / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 400 <= width <= 2000 and 400 <= height <= 2000
    assert np.asarray(Image.open(path).convert("L")).std() > 10  # something was drawn, not a blank canvas


def test_confusion_matrix_grows_with_classes_and_needs_png(tmp_path):
    small = evaluate_predictions(_table([("a", "a", ["a"])]), ("a", "b", "c"))
    names = tuple(f"c{i}" for i in range(40))
    large = evaluate_predictions(_table([("c0", "c0", ["c0"])]), names)
    small_size = Image.open(draw_confusion_matrix(small, tmp_path / "s.png", "small")).size
    large_size = Image.open(draw_confusion_matrix(large, tmp_path / "l.png", "large")).size
    assert large_size[0] > small_size[0] and large_size[1] > small_size[1]
    with pytest.raises(ValueError, match=r"must end in \.png"):
        draw_confusion_matrix(small, tmp_path / "s.jpg", "small")
