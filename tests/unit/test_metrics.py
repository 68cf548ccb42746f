import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from simpsons.metrics import classification_report, confusion_matrix, per_class_csv, plot_confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n_classes = 12
    y_true = rng.integers(0, n_classes - 2, 500)  # the last two classes never occur
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, n_classes, 500))
    cm = confusion_matrix(torch.as_tensor(y_true), torch.as_tensor(y_pred), n_classes)
    report = classification_report(cm, [f"c{i}" for i in range(n_classes)])
    present = np.unique(y_true)
    kw = dict(labels=present, zero_division=0)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", **kw))
    assert report["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", **kw))
    assert report["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro", **kw))
    assert report["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", **kw))
    per_class_f1 = f1_score(y_true, y_pred, average=None, **kw)
    for cls, expected in zip(present, per_class_f1):
        assert report["per_class"][cls]["f1"] == pytest.approx(expected)


def test_class_without_images_is_reported_not_scored():
    cm = np.array([[5, 0, 0], [1, 3, 0], [0, 2, 0]])  # class 2 has images but is never predicted
    cm = np.pad(cm, ((0, 1), (0, 1)))  # class 3: no images at all
    report = classification_report(cm, ["a", "b", "c", "d"])
    d = report["per_class"][3]
    assert d["support"] == 0 and d["f1"] is None and "no images" in d["note"]
    assert report["classes_without_images"] == ["d"]
    assert report["per_class"][2]["f1"] == 0.0  # present but never predicted: scored 0, not skipped
    assert report["macro_f1"] == pytest.approx(np.mean([report["per_class"][i]["f1"] for i in range(3)]))


def test_summed_worker_matrices_give_the_whole_split_figures():
    rng = np.random.default_rng(3)
    y, p = torch.as_tensor(rng.integers(0, 5, 300)), torch.as_tensor(rng.integers(0, 5, 300))
    shards = [confusion_matrix(y[r::2], p[r::2], 5) for r in range(2)]
    assert torch.equal(shards[0] + shards[1], confusion_matrix(y, p, 5))


def test_csv_and_png_are_written(tmp_path):
    cm = np.array([[3, 1], [0, 0]])
    report = classification_report(cm, ["bart_simpson", "lisa_simpson"])
    rows = per_class_csv(report).splitlines()
    assert rows[0] == "class,precision,recall,f1,support,predicted"
    assert rows[2] == "lisa_simpson,,,,0,1"
    plot_confusion(cm, ["bart_simpson", "lisa_simpson"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
