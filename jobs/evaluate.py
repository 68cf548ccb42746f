"""Evaluate a checkpoint on labelled images: the same per-class report and PNG as training.

    python jobs/evaluate.py --checkpoint runs/local/best --data ../data/dataset/testset --out runs/local/test
    python jobs/evaluate.py --checkpoint runs/local/best --data ~/kaggle/simpsons --out runs/local/kaggle-test

--data takes a labelled folder <folder>/<class>/*.jpg (scored whole) or any source train.py --data
takes: a tree with train/val/testset (testset scored, else val), Kaggle's layout (its flat
kaggle_simpson_testset/<class>_<n>.jpg scored), an archive or URL of one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import run_job  # noqa: E402
from simpsons.names import CACHE_DIR  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder or a checkpoint.pt")
    parser.add_argument(
        "--data", required=True, help="<folder>/<class>/*.jpg, or any image tree, archive or URL that train.py takes"
    )
    parser.add_argument("--split", help="split to evaluate when --data has splits (default: testset, else val)")
    parser.add_argument("--out", required=True, help="folder for metrics.json, per_class.csv, confusion.png")
    parser.add_argument(
        "--cache-dir",
        default=CACHE_DIR,
        help="where an archive or URL is fetched and unpacked (default: %(default)s)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one, else the CPU)")
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons.inference import evaluate_folder
    from simpsons.report import write_report

    report, cm, bad_files = evaluate_folder(
        args.checkpoint, args.data, args.split, device=args.device, cache_dir=args.cache_dir
    )
    report["files_left_out"] = bad_files
    names = [row["class"] for row in report["per_class"]]
    write_report(args.out, report, cm, names, title=f"{args.data}: macro-F1 {report['macro_f1']:.3f}")
    print(
        f"{report['images']} images: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
        f"ECE {report['ece']:.4f} at temperature {report['temperature']:.3f} "
        f"({report['classes_scored']} classes scored, {len(bad_files)} files left out) -> {args.out}"
    )


if __name__ == "__main__":
    run_job(main, get_args_parser())
