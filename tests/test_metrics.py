"""Metric functions against hand-computed examples (no scikit-learn needed)."""

import numpy as np
import pytest

from jaxfer import metrics

# labels / predictions used throughout; by hand:
#   confusion (row true, col pred) = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
#   precision = [1/2, 2/3, 1], recall = [1/2, 1, 1/2], f1 = [1/2, 4/5, 2/3]
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 1, 1, 1, 0, 2])
CONFUSION = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
F1 = [0.5, 0.8, 2 / 3]


def test_accuracy_and_confusion():
    assert metrics.accuracy(LABELS, PREDS) == pytest.approx(4 / 6)
    assert metrics.accuracy([], []) == 0.0
    np.testing.assert_array_equal(metrics.confusion_matrix(LABELS, PREDS, 3), CONFUSION)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.confusion_matrix([0, 3], [0, 0], 3)


def test_precision_recall_f1_by_hand():
    p, r, f, s = metrics.precision_recall_f1(np.array(CONFUSION))
    np.testing.assert_allclose(p, [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(r, [0.5, 1.0, 0.5])
    np.testing.assert_allclose(f, F1)
    np.testing.assert_array_equal(s, [2, 2, 2])
    assert metrics.macro_f1(LABELS, PREDS) == pytest.approx(np.mean(F1))


def test_zero_division_and_absent_classes():
    # class 2 never occurs: it is left out of the macro average; class 1 is never
    # predicted: its precision is 0, not nan.
    p, r, f, _ = metrics.precision_recall_f1(metrics.confusion_matrix([0, 1], [0, 0], 3))
    np.testing.assert_allclose(p, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(f, [2 / 3, 0.0, 0.0])
    assert metrics.macro_f1([0, 1], [0, 0], num_classes=3) == pytest.approx(1 / 3)


def test_classification_report_from_logits_with_names():
    logits = np.eye(3)[PREDS] * 2.0 - 1.0
    report = metrics.classification_report(LABELS, logits, ["neg", "neu", "pos"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro_f1"] == pytest.approx(np.mean(F1))
    assert report["num_examples"] == 6
    assert report["confusion_matrix"] == CONFUSION
    assert report["per_class"]["neu"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                                          "f1": pytest.approx(0.8), "support": 2}
    text = metrics.format_report(report)
    assert "neu" in text and "confusion matrix" in text and "0.6667" in text
    with pytest.raises(ValueError, match="label_names"):
        metrics.classification_report(LABELS, logits, ["a", "b"])


def test_majority_baseline():
    report = metrics.majority_baseline([2, 2, 1, 0, 2], LABELS, 3)
    assert report["majority_class"] == 2
    assert report["accuracy"] == pytest.approx(2 / 6)
    # only class 2 is predicted or present... all three are present in labels:
    # f1 = [0, 0, 2*(1/3*1)/(1/3+1) = 1/2]
    assert report["macro_f1"] == pytest.approx(0.5 / 3)
    # ties go to the smallest id
    assert metrics.majority_baseline([1, 0], [0], 2)["majority_class"] == 0


def test_multi_label():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    logits = np.array([[3, -1, -2], [-1, 2, 1], [1, 1, -1], [-1, -1, -1]], np.float32)
    # per label: tp = [2, 2, 0], fp = [0, 0, 1], fn = [0, 0, 1]
    report = metrics.compute("multi_label", logits, labels, ["a", "b", "c"])
    assert report["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert report["macro_f1"] == pytest.approx((1 + 1 + 0) / 3)
    assert report["subset_accuracy"] == pytest.approx(2 / 4)  # rows 0 and 1 miss label c
    assert report["per_class"]["c"]["support"] == 1


def test_regression():
    targets = np.array([1.0, 2.0, 3.0, 4.0])
    preds = np.array([[1.5], [2.0], [2.0], [5.0]])  # [N, 1] head output
    # errors 0.5, 0, -1, 1 -> mse = 2.25/4, mae = 2.5/4; sst = 5
    report = metrics.compute("regression", preds, targets)
    assert report["mse"] == pytest.approx(0.5625)
    assert report["mae"] == pytest.approx(0.625)
    assert report["rmse"] == pytest.approx(0.75)
    assert report["r2"] == pytest.approx(1 - 2.25 / 5)
    assert metrics.mse(targets, targets) == 0.0
    # rows without a target (NaN) are left out
    missing = metrics.compute("regression", np.r_[preds, [[9.0]]], np.r_[targets, np.nan])
    assert missing["num_examples"] == 4 and missing["mse"] == pytest.approx(0.5625)


def test_compute_classification_soft_labels_and_token_padding():
    logits = np.eye(3)[PREDS].astype(np.float32)
    soft = np.eye(3)[LABELS] * 0.8 + 0.1
    assert metrics.compute("classification", logits, soft)["accuracy"] == pytest.approx(4 / 6)
    # token task: [B, T, C] logits, [B, T] labels with -100 padding dropped
    tokens = logits.reshape(2, 3, 3)
    labels = LABELS.reshape(2, 3).copy()
    labels[1, 2] = -100
    report = metrics.compute("classification", tokens, labels)
    assert report["num_examples"] == 5
    assert report["accuracy"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="unknown task"):
        metrics.compute("ranking", logits, LABELS)
