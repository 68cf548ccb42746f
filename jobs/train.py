"""Train the Simpsons classifier with Ray Train.

python jobs/train.py --config configs/local.yaml --set optim.epochs=2
python jobs/train.py --data ../shared/data/simpsons_dataset --workers 2
ray job submit --working-dir . -- python jobs/train.py --config configs/cluster.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import add_config_args, add_shorthand_args, load_job_config, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(
        parser,
        config_help="YAML config (see configs/); defaults are in simpsons/config.py",
        set_help="override a config value, e.g. --set optim.lr=0.001 (repeatable)",
    )
    add_shorthand_args(parser)
    parser.add_argument("--smoke-test", action="store_true", help="one short epoch on little data, to check the wiring")
    return parser


def main(args: argparse.Namespace) -> None:
    cfg = load_job_config(args)  # a bad config is refused before Ray is imported
    from simpsons.driver import fit

    fit(cfg)  # checks first: a run that cannot happen fails in seconds, before any data is prepared


if __name__ == "__main__":
    run_job(main, get_args_parser())
