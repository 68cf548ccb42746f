"""The run report: the files a person opens after a run (or a sweep's best trial).

best/checkpoint.pt     plain state dicts (model unwrapped), config, class names, history, temperature
best/model.pt2         the deployable model: torch.export program, uint8 images in, probabilities out
best/metrics.json      overall and per-class figures of the best epoch, plus every epoch's history;
                       ECE and NLL of the served probabilities and the temperature (`calibration`:
                       both before and after it, fitted on the validation split when best/ is written)
best/per_class.csv     precision / recall / F1 / support per class
best/confusion.png     42 x 42 confusion matrix with readable labels
best/curves.png        loss, accuracy and macro-F1 per epoch
best/config.yaml       the resolved config
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from simpsons import checkpoint, storage
from simpsons.calibration import calibrate
from simpsons.config import Config, save_config
from simpsons.dataset import local_dataset_dir
from simpsons.deploy import MODEL_FILE, export_model
from simpsons.inference import load_checkpoint, split_logits
from simpsons.metrics import per_class_csv, plot_confusion
from simpsons.names import SCORE

_logger = logging.getLogger(__name__)

REPORT_FILE = "metrics.json"  # the report's figures; written last, so its presence means complete
OUTPUT_FILES = (
    checkpoint.CHECKPOINT_FILE,
    MODEL_FILE,
    REPORT_FILE,
    "per_class.csv",
    "confusion.png",
    "curves.png",
    "config.yaml",
)


def write_report(
    out_dir: str | Path, report: dict, cm, class_names, history: list[dict] | None = None, title: str = ""
) -> None:
    """metrics.json, per_class.csv, confusion.png (and curves.png with a history) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(report)
    if history:
        payload["history"] = history
    (out_dir / "per_class.csv").write_text(per_class_csv(report))
    plot_confusion(np.asarray(cm), class_names, out_dir / "confusion.png", title=title)
    if history:
        plot_curves(history, out_dir / "curves.png")
    # metrics.json last: readers treat its presence as "the report is complete".
    (out_dir / REPORT_FILE).write_text(json.dumps(payload, indent=1))


def write_best(
    checkpoint_dir: str | Path,
    dest_uri: str,
    cfg: Config,
    history: list[dict] | None = None,
    publish: Callable[[Path], None] | None = None,
) -> dict:
    """Write the report of a reported checkpoint folder as the best/ folder at dest_uri (local or s3://).

    `history` is the whole run's per-epoch metrics (from the latest checkpoint); by default the
    best checkpoint's own, which stops at the best epoch. `publish` is given the local best/ folder
    once it is complete (the MLflow run's artifacts: `tracking.TrackedRun.log_best`).

    The calibration temperature is fitted here, on the validation split of the dataset named in the
    checkpoint's provenance (read on this machine), and goes into checkpoint.pt, model.pt2 and
    metrics.json (simpsons.calibration).
    """
    checkpoint_dir = Path(checkpoint_dir)
    saved = checkpoint.read_metrics(checkpoint_dir)
    history = history or saved["history"]
    with tempfile.TemporaryDirectory() as tmp:
        best_file = Path(tmp) / checkpoint.CHECKPOINT_FILE
        shutil.copy(checkpoint_dir / checkpoint.CHECKPOINT_FILE, best_file)
        model, saved_cfg, class_names, _ = load_checkpoint(best_file)  # the GPU when the driver has one
        dataset_dir = local_dataset_dir(saved["provenance"]["dataset_uri"], cfg.data.cache_dir, cfg.run.s3_endpoint)
        calibration = calibrate(*split_logits(model, saved_cfg, dataset_dir))
        checkpoint.save_temperature(best_file, calibration["temperature"])
        report = {
            "epoch": saved["epoch"],
            **{k: v for k, v in saved["val"].items() if k != "per_class"},
            # the served (calibrated) probabilities' figures beside accuracy; `calibration` has both sides
            "ece": calibration["ece_after"],
            "nll": calibration["nll_after"],
            "temperature": calibration["temperature"],
            "calibration": calibration,
            "per_class": saved["val"]["per_class"],
            "provenance": saved.get("provenance"),
        }
        export_model(model, saved_cfg, class_names, Path(tmp) / MODEL_FILE, calibration["temperature"])
        save_config(cfg, Path(tmp) / "config.yaml")
        title = f"{cfg.run.name}: validation, epoch {saved['epoch'] + 1}, macro-F1 {report['macro_f1']:.3f}"
        write_report(tmp, report, saved["confusion"], report_class_names(report), history, title)
        storage.upload_dir(tmp, dest_uri, cfg.run.s3_endpoint)
        if publish:
            publish(Path(tmp))
    _logger.info(
        "Best epoch %d: val macro-F1 %.4f, accuracy %.4f, ECE %.4f (%.4f before temperature %.3f) -> %s",
        saved["epoch"] + 1,
        report["macro_f1"],
        report["accuracy"],
        calibration["ece_after"],
        calibration["ece_before"],
        calibration["temperature"],
        dest_uri,
    )
    return {**report, "history": history}


def report_class_names(report: dict) -> list[str]:
    return [row["class"] for row in report["per_class"]]


def plot_curves(history: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for ax, (title, keys) in zip(
        axes,
        [
            ("loss", ("train_loss", "val_loss")),
            ("accuracy", ("train_acc", "val_acc")),
            ("validation macro-F1", (SCORE,)),
        ],
    ):
        for key in keys:
            # val_* and the score: the evaluated epochs only (train.evaluate_every)
            shown = [(epoch, h[key]) for epoch, h in zip(epochs, history) if math.isfinite(h.get(key, math.nan))]
            ax.plot([e for e, _ in shown], [v for _, v in shown], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
