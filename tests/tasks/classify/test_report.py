"""The classify summary's report, from a table of predictions: label counts, score histogram, least confident
images, and accuracy with a confusion matrix over the true labels that are classes of the model."""

import pyarrow as pa

from tasks.classify.report import MATRIX_UP_TO, TOP_LABELS, prediction_report, report_markdown


def _table(labels, scores, truth):
    return pa.table({"image_uri": [f"/d/{i}.jpg" for i in range(len(labels))], "label": labels,
                     "score": pa.array(scores, pa.float32()), "topk_labels": [[x] for x in labels],
                     "true_label": pa.array(truth, pa.string())})


def test_label_counts_are_the_top_ones_and_the_rest_summed():
    labels = [f"c{i}" for i in range(TOP_LABELS + 5)] + ["c0"] * 3
    report = prediction_report(_table(labels, [0.5] * len(labels), [None] * len(labels)), labels[:-3], "t")
    assert report.label_counts[0] == ("c0", 4) and len(report.label_counts) == TOP_LABELS
    assert (report.other_labels, report.other_rows) == (5, 5) and report.accuracy is None
    assert "Against the true labels" not in report_markdown(report)


def test_scores_are_binned_and_the_least_confident_listed_first():
    scores = [0.05, 0.95, 0.99, 0.42, 1.0]
    report = prediction_report(_table(["a"] * 5, scores, [None] * 5), ["a", "b"], "t")
    assert report.score_counts == (1, 0, 0, 0, 1, 0, 0, 0, 0, 3)  # 1.0 falls in the last bin
    assert [uri for uri, _, _ in report.lowest][:2] == ["/d/0.jpg", "/d/3.jpg"]


def test_accuracy_counts_only_true_labels_the_model_knows():
    report = prediction_report(_table(["a", "a", "b", "b"], [0.9] * 4, ["a", "b", "b", "owl"]), ["a", "b"], "t")
    assert (report.labelled, report.accuracy, report.unknown_truth) == (3, 2 / 3, 1)
    assert report.confusion_png[:8] == b"\x89PNG\r\n\x1a\n"
    text = report_markdown(report)
    assert "accuracy **0.6667** over 3 labelled images" in text and "1 images have a true label that is not" in text


def test_too_many_classes_for_a_drawing_are_said_not_drawn():
    names = [f"c{i}" for i in range(MATRIX_UP_TO + 1)]
    report = prediction_report(_table(names, [0.9] * len(names), names), names, "t")
    assert report.accuracy == 1.0 and report.confusion_png is None
    assert f"{MATRIX_UP_TO + 1} classes occur: the confusion matrix is drawn up to {MATRIX_UP_TO}" in report.matrix_note


def test_a_pipe_in_a_label_does_not_break_the_table():
    report = prediction_report(_table(["a|b", "c"], [0.2, 0.3], [None, None]), ["a|b", "c"], "t")
    assert "| a\\|b | 1 | 50.0% |" in report_markdown(report)
