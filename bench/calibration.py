"""What the calibration temperature buys: a checkpoint's validation-split ECE and NLL before and
after temperature scaling, fitted as best/ is (simpsons.calibration), plus a held-out figure.

The temperature is fitted on the very split it is scored on, which flatters it, so the split is
also cross-fitted: a temperature fitted on every other image scores the rest, both ways, and the
two halves' ECE bins are summed into one held-out ECE. Logits are computed once, as they are served
(fp32, the run's evaluation preset and test-time flip).

    python bench/calibration.py --checkpoint runs/local/best                    # the dataset its provenance names
    python bench/calibration.py --checkpoint runs/local/best --dataset cache/packed/<key>

Prints one figure a line: val_images, val_acc, temperature, val_ece_before, val_ece_after,
val_nll_before, val_nll_after, heldout_ece_after, heldout_nll_after, temperature_halves, seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder or a checkpoint.pt")
    parser.add_argument(
        "--dataset", help="the packed dataset folder to score the val split of (default: the checkpoint's provenance)"
    )
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons import calibration
    from simpsons.data import DataError
    from simpsons.inference import load_checkpoint, split_logits

    started = time.perf_counter()
    model, cfg, _, state = load_checkpoint(args.checkpoint, args.device)
    dataset = args.dataset or (state.get("provenance") or {}).get("dataset_uri")
    if not dataset:
        raise DataError(f"{args.checkpoint} names no dataset in its provenance; pass --dataset <packed folder>.")
    logits, labels = split_logits(model, cfg, dataset)
    fitted = calibration.calibrate(logits, labels)
    bins, nll_sum, halves = 0, 0.0, []
    for fit_on in (0, 1):  # fit on every other image, score the others
        fit, scored = slice(fit_on, None, 2), slice(1 - fit_on, None, 2)
        temperature = calibration.fit_temperature(logits[fit], labels[fit])
        bins = bins + calibration.calibration_bins(
            calibration.probabilities(logits[scored], temperature), labels[scored]
        )
        nll_sum += calibration.negative_log_likelihood(logits[scored], labels[scored], temperature) * len(
            labels[scored]
        )
        halves.append(temperature)
    figures = {
        "val_images": len(labels),
        "val_acc": float((logits.argmax(1) == labels).double().mean()),
        "temperature": fitted["temperature"],
        "val_ece_before": fitted["ece_before"],
        "val_ece_after": fitted["ece_after"],
        "val_nll_before": fitted["nll_before"],
        "val_nll_after": fitted["nll_after"],
        "heldout_ece_after": calibration.expected_calibration_error(bins),
        "heldout_nll_after": nll_sum / len(labels),
        "temperature_halves": "/".join(f"{t:.4f}" for t in halves),
        "seconds": time.perf_counter() - started,
    }
    for name, value in figures.items():
        print(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}", flush=True)


if __name__ == "__main__":
    run_job(main, get_args_parser(), log_stream=sys.stderr)
