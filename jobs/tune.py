"""Sweep focal alpha/gamma and the learning rate with Ray Tune; every trial is a Ray Train run.

python jobs/tune.py --config configs/tune.yaml --data ../shared/data/simpsons_dataset
python jobs/tune.py --config configs/tune.yaml --set tune.num_samples=16 --set run.storage=s3://bucket/simpsons
python jobs/tune.py --config configs/tune.yaml --resume          # continue an interrupted sweep
ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml --set run.storage=s3://...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import add_config_args, add_shorthand_args, job_overrides, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(
        parser,
        "configs/tune.yaml",
        config_help="YAML config: training sections plus a tune: section (default configs/tune.yaml)",
        set_help="override a value, e.g. --set optim.epochs=6, --set tune.num_samples=16, "
        "--set 'tune.space.optim.lr={loguniform: [1.0e-4, 1.0e-2]}' (repeatable)",
    )
    add_shorthand_args(parser, workers_help="Ray Train workers per trial (same as --set train.workers=N)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep of the same name and storage; finished trials are kept",
    )
    parser.add_argument(
        "--smoke-test", action="store_true", help="two short trials on little data, to check the wiring"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons.config import load_sweep

    smoke = ["tune.num_samples=2", "tune.grace_period=1"] if args.smoke_test else []
    cfg = load_sweep(args.config, job_overrides(args) + smoke)  # a bad config is refused before Ray is imported
    from simpsons.tune import run_sweep

    run_sweep(cfg, resume=args.resume)


if __name__ == "__main__":
    run_job(main, get_args_parser())
