"""Accuracy under a fixed budget: the original project's recipe against this project's default.

Both recipes train the original network from scratch on the shared real sample's train split and
are scored on its val split, with the same epochs, resolution, precision and hardware. Prints one
figure a line: per epoch `<recipe>_epoch<N>_val_macro_f1`, then per recipe the best macro-F1,
accuracy and wall time, and the gain of the default recipe in macro-F1 points.

    python bench/accuracy.py --profile cpu    # 64 px, 6 epochs per recipe: about 40 min on 2 cores
    python bench/accuracy.py --profile gpu    # 128 px, 30 epochs on one GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simpsons.config import load_config  # noqa: E402

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "simpsons_dataset"
PROFILES = {
    # Lower resolution keeps both recipes inside ~40 minutes on 2 CPU cores.
    "cpu": ["data.stored_size=72", "data.train_size=64", "optim.epochs=6", "train.use_gpu=false"],
    "gpu": ["data.stored_size=144", "data.train_size=128", "optim.epochs=30", "train.use_gpu=true"],
    # Seconds, for tests: pass --data with a small tree.
    "quick": [
        "data.stored_size=40",
        "data.train_size=32",
        "optim.epochs=2",
        "train.use_gpu=false",
        "optim.batch_size=32",
    ],
}
RECIPES = {"original": REPO / "configs" / "original.yaml", "default": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--data", default=str(SHARED_SAMPLE), help="raw data source (default: the shared real sample)")
    parser.add_argument("--recipes", default="original,default")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "accuracy"))
    parser.add_argument("--set", action="append", default=[], help="extra overrides for both recipes")
    args = parser.parse_args()
    if args.data == str(SHARED_SAMPLE) and not SHARED_SAMPLE.exists():
        print(f"skipped: the shared real sample is not at {SHARED_SAMPLE}")
        return

    from simpsons.train import fit

    results = {}
    for recipe in args.recipes.split(","):
        cfg = load_config(
            RECIPES[recipe],
            PROFILES[args.profile]
            + args.set
            + [
                f"data.source={args.data}",
                f"data.cache_dir={REPO / 'cache'}",
                "train.workers=1",
                f"run.storage={args.out}",
                f"run.name={args.profile}-{recipe}-{int(time.time())}",
            ],
        )
        started = time.perf_counter()
        report = fit(cfg)  # joins (or starts) Ray as the jobs do
        wall = time.perf_counter() - started
        for h in report["history"]:
            print(f"{recipe}_epoch{h['epoch'] + 1}_val_macro_f1 {h['val_macro_f1']:.4f}")
        results[recipe] = report
        print(f"{recipe}_best_val_macro_f1 {report['macro_f1']:.4f}")
        print(f"{recipe}_best_val_acc {report['accuracy']:.4f}")
        print(f"{recipe}_best_epoch {report['epoch'] + 1}")
        print(f"{recipe}_wall_s {wall:.0f}", flush=True)
    if {"original", "default"} <= set(results):
        gain = 100 * (results["default"]["macro_f1"] - results["original"]["macro_f1"])
        print(f"default_minus_original_macro_f1_points {gain:.1f}")


if __name__ == "__main__":
    main()
