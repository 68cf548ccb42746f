"""Classification metrics as small pure functions of a confusion matrix.

`cm[t, p]` counts images of true class t predicted as p. Workers sum their matrices (an
all-reduce of one (C, C) tensor), so every figure below is exact for the whole split. A class
with no images in the evaluated split has no recall or F1: it is reported with support 0 and
left out of the macro averages instead of being scored 0 or 1.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    # targets, preds: (N,) int -> (C, C) int64 on the same device
    flat = targets.long() * num_classes + preds.long()
    # scatter_add_ into a fixed (C * C,) shape, not torch.bincount: on CUDA bincount reads the
    # input's min and max back to the host (a sync per evaluation batch) to size its output.
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=flat.device)
    return cm.scatter_add_(0, flat, torch.ones_like(flat)).reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """Overall and per-class figures from a confusion matrix (rows = true class)."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    scored = support > 0
    total = support.sum()
    per_class = []
    for i, name in enumerate(class_names):
        row = {"class": name, "support": int(support[i]), "predicted": int(predicted[i])}
        if scored[i]:
            row.update(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]))
        else:
            row.update(precision=None, recall=None, f1=None, note="no images in this split")
        per_class.append(row)

    def macro(values: np.ndarray) -> float:
        return float(values[scored].mean()) if scored.any() else 0.0

    return {
        "images": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "classes_scored": int(scored.sum()),
        "classes_without_images": [name for name, s in zip(class_names, scored) if not s],
        "per_class": per_class,
    }


def per_class_csv(report: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["class", "precision", "recall", "f1", "support", "predicted"])
    for row in report["per_class"]:
        cells = ["" if row[k] is None else f"{row[k]:.4f}" for k in ("precision", "recall", "f1")]
        writer.writerow([row["class"], *cells, row["support"], row["predicted"]])
    return out.getvalue()


def plot_confusion(
    cm: np.ndarray | torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """A row-normalised confusion matrix as PNG, large enough to read 42 labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    size = max(6.0, 0.32 * n + 3)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), [f"{name} ({int(r)})" for name, r in zip(class_names, rows[:, 0])], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class (images)")
    for t in range(n):
        for p in range(n):
            if cm[t, p]:
                ax.text(
                    p,
                    t,
                    int(cm[t, p]),
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white" if norm[t, p] > 0.5 else "black",
                )
    ax.set_title(title or "Confusion matrix (row-normalised colour, counts in cells)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
