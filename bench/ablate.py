"""What the moving average and the test-time flip each buy, from one run: its best checkpoint scored
on the packed validation split four ways (raw or averaged weights x flip off or on).

The averaged weights never feed back into training, so the raw weights without the flip are the
same run's network as without optim.ema_decay and model.tta_flip: one training run gives all four.

    python bench/ablate.py --checkpoint runs/v1/best --dataset cache/packed/<key>

Prints `<weights>_<flip>_val_macro_f1` and `_val_acc` one a line (weights: raw or ema; flip: noflip
or flip).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from simpsons.cli import run_job
from simpsons.dataset import load_packed
from simpsons.inference import load_checkpoint, predict_proba
from simpsons.metrics import classification_report, confusion_matrix
from simpsons.recipe import create_eval_preset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder (trained with optim.ema_decay > 0)")
    parser.add_argument("--dataset", required=True, help="the packed dataset folder the run trained on")
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> None:
    model, cfg, class_names, state = load_checkpoint(args.checkpoint, args.device)
    images, labels = load_packed(Path(args.dataset), "val")
    labels = torch.as_tensor(labels.astype("int64"))
    preset = create_eval_preset(cfg)
    for weights in ("raw", "ema"):
        if weights == "ema" and "served" not in state:
            continue
        model.load_state_dict(state["model"] if weights == "raw" else state["served"])
        for flip in (False, True):
            probs = predict_proba(model, images, preset, flip=flip)
            report = classification_report(confusion_matrix(labels, probs.argmax(1), len(class_names)), class_names)
            name = f"{weights}_{'flip' if flip else 'noflip'}"
            print(f"{name}_val_macro_f1 {report['macro_f1']:.4f}")
            print(f"{name}_val_acc {report['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    run_job(main, get_args_parser(), log_stream=sys.stderr)
