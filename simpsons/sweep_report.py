"""The sweep report: what a person opens after a sweep, the counterpart of a run's `report`.

Everything lands in the sweep folder `<run.storage>/<tune.name>/` (a local folder or s3://):

    sweep.yaml     the resolved config the sweep started with (training sections and tune:)
    trials.csv     one row per trial, best val macro-F1 first: sampled values, best epoch's figures
    trials.png     best val macro-F1 of every trial against each searched value
    best/          the best trial's best checkpoint, reported as a single run's best/ (`report.write_best`)
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import yaml

from simpsons import storage
from simpsons.checkpoint import read_metrics
from simpsons.config import Config, to_dict
from simpsons.names import EVALUATED, SCORE
from simpsons.report import write_best

_logger = logging.getLogger(__name__)


def write_sweep_config(cfg: Config, sweep_uri: str) -> None:
    """sweep.yaml: the resolved config a new sweep starts with."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        storage.upload_dir(tmp, sweep_uri, cfg.run.s3_endpoint)


def summarize_trials(cfg: Config, sweep_uri: str) -> list[dict]:
    """One row per trial, best val macro-F1 first: params, best epoch's figures, epochs run, status.

    Raises when no trial reported a result: there is nothing to report then.
    """
    from ray import tune

    fs, path = storage.pyarrow_filesystem(sweep_uri, cfg.run.s3_endpoint)
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=fs)
    rows = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        row = {"trial_id": trial.trial_id, **{k: v for k, v in trial.config.items()}}
        if frame is None or frame.empty or SCORE not in frame:
            row.update(status="error" if trial.status == "ERROR" else "no results", epochs_run=0)
            rows.append(row)
            continue
        frame = frame.dropna(subset=[SCORE])
        # An epoch train.evaluate_every skipped reported the last evaluated score to Tune: never the best.
        scored = frame[frame[EVALUATED].fillna(True).astype(bool)] if EVALUATED in frame else frame
        # Ties go to the later epoch: it is the one Ray Train keeps among equally scored checkpoints.
        best = scored.sort_values([SCORE, "epoch"]).iloc[-1]
        epochs_run = int(frame["epoch"].max()) + 1
        if trial.status == "ERROR":
            status = "error"
        else:
            status = "completed" if epochs_run >= cfg.optim.epochs else "stopped early"
        row.update(
            status=status,
            epochs_run=epochs_run,
            best_val_macro_f1=float(best[SCORE]),
            best_epoch=int(best["epoch"]) + 1,
            val_acc=float(best["val_acc"]),
            val_loss=float(best["val_loss"]),
            checkpoint=best.get("checkpoint_path", ""),
            history=frame.drop_duplicates("epoch", keep="last").sort_values("epoch").to_dict("records"),
        )
        rows.append(row)
    rows.sort(key=lambda r: r.get("best_val_macro_f1", -1.0), reverse=True)
    if not rows or "best_val_macro_f1" not in rows[0]:
        raise RuntimeError(f"No trial of the sweep at {sweep_uri} reported a result; see the trials' error.txt there.")
    return rows


def searched_keys(rows: list[dict]) -> list[str]:
    """The config keys the sweep sampled (e.g. optim.lr), as they appear in the rows."""
    return [k for k in rows[0] if "." in k]


def write_sweep_report(
    rows: list[dict], sweep_uri: str, best_cfg: Config, publish: Callable[[Path, str], None] | None = None
) -> None:
    """trials.csv and trials.png into the sweep folder, the table in the log, and best/ written from
    the best trial (rows[0], from `summarize_trials`) trained with `best_cfg`. `publish(folder, path)`
    is given each local folder once it is complete (the sweep's MLflow run: trials at "", best/ at "best")."""
    params = searched_keys(rows)
    columns = [
        "trial_id",
        "status",
        *params,
        "best_val_macro_f1",
        "best_epoch",
        "val_acc",
        "val_loss",
        "epochs_run",
        "checkpoint",
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    endpoint = best_cfg.run.s3_endpoint
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.csv").write_text(text.getvalue())
        title = f"{posixpath.basename(sweep_uri)}: {len(rows)} trials"
        plot_trials(rows, params, Path(tmp) / "trials.png", title=title)
        storage.upload_dir(tmp, sweep_uri, endpoint)
        if publish:
            publish(Path(tmp), "")
    _logger.info("%s", format_table(rows, params))

    best = rows[0]
    fs, _ = storage.pyarrow_filesystem(sweep_uri, endpoint)
    checkpoint = ray.train.Checkpoint(best["checkpoint"], filesystem=fs)
    _logger.info("Best trial %s: exporting its epoch %d checkpoint", best["trial_id"], best["best_epoch"])
    with checkpoint.as_directory() as ckpt_dir:
        # The checkpoint's own history stops at its epoch; curves.png gets every epoch the trial
        # ran (Tune's copy of them, with the keys the training loop reports).
        keys = read_metrics(ckpt_dir)["history"][0].keys()
        history = [{k: epoch[k] for k in keys if k in epoch} for epoch in best["history"]]
        best_publish = (lambda folder: publish(folder, "best")) if publish else None
        write_best(ckpt_dir, storage.join(sweep_uri, "best"), best_cfg, history=history, publish=best_publish)


def format_table(rows: list[dict], params: list[str]) -> str:
    """The trials as a markdown table (also what bench/RESULTS.md's sweep table is made of)."""
    head = ["trial", *params, "val macro-F1", "val acc", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        figures = [format_value(r.get(p)) for p in params]
        f1 = f"{r['best_val_macro_f1']:.4f}" if "best_val_macro_f1" in r else "-"
        acc = f"{r['val_acc']:.4f}" if "val_acc" in r else "-"
        lines.append("| " + " | ".join([r["trial_id"], *figures, f1, acc, str(r["epochs_run"]), r["status"]]) + " |")
    return "\n".join(lines)


def plot_trials(rows: list[dict], params: list[str], path: str | Path, title: str = "") -> None:
    """Best val macro-F1 of every trial against each searched value (log axis for lr-like ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scored = [r for r in rows if "best_val_macro_f1" in r]
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4.2 * max(1, len(params)), 3.8), dpi=110, squeeze=False)
    styles = {"completed": ("o", "tab:blue"), "stopped early": ("v", "tab:orange"), "error": ("x", "tab:red")}
    for ax, param in zip(axes[0], params):
        values = [r[param] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
            positive = [v for v in values if v > 0]
            if positive and len(positive) == len(values) and max(values) / min(values) >= 20:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # they overlap
        else:  # e.g. alpha chosen from 'auto' and numbers: one column per choice
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for status, (marker, colour) in styles.items():
            picked = [(x, r["best_val_macro_f1"]) for x, r in zip(xs, scored) if r["status"] == status]
            if picked:
                ax.scatter(*zip(*picked), marker=marker, color=colour, s=45, label=status)
        if scored:
            ax.scatter(
                [xs[0]],
                [scored[0]["best_val_macro_f1"]],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors="black",
                label="best",
            )
        ax.set_xlabel(param)
        ax.set_ylabel("best val macro-F1")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_value(value: Any) -> str:
    """A sampled value, short: three significant figures below 0.01 and from 1000 on, else up to three decimals."""
    if isinstance(value, float):
        if value and (abs(value) < 1e-2 or abs(value) >= 1e3):
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)
