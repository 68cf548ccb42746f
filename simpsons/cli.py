"""What every job in jobs/ shares: arguments, the config they make, and clean error exits.

Job plumbing only: the library never imports this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from simpsons.config import Config, load_config
from simpsons.errors import UserError
from simpsons.logs import configure_logging


def job_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` items, then the shorthand flags as the overrides they stand for (they win)."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "data", None):
        overrides.append(f"data.source={args.data}")
    if getattr(args, "workers", None):
        overrides.append(f"train.workers={args.workers}")
    if getattr(args, "gpu", False):
        overrides.append("train.use_gpu=true")
    if getattr(args, "smoke_test", False):
        overrides += ["optim.epochs=1", "data.train_size=64", "data.stored_size=72"]
    return overrides


def add_config_args(
    parser: argparse.ArgumentParser, default_config: str | None = None, *, config_help: str, set_help: str
) -> None:
    """The `--config` file and the repeatable `--set KEY=VALUE` that job_overrides reads."""
    parser.add_argument("--config", default=default_config, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def add_shorthand_args(
    parser: argparse.ArgumentParser, workers_help: str = "Ray Train workers (same as --set train.workers=N)"
) -> None:
    """`--data`, `--workers` and `--gpu`: shorthands that job_overrides turns into their overrides."""
    parser.add_argument(
        "--data", help="raw data source (folder, archive, URL, Drive link); same as --set data.source=..."
    )
    parser.add_argument("--workers", type=int, help=workers_help)
    parser.add_argument("--gpu", action="store_true", help="train on GPUs, one per worker")


def load_job_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, job_overrides(args))


def run_job(
    main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, log_stream: TextIO | None = None
) -> None:
    """Parse arguments and run `main`; a user error becomes one line on stderr and exit status 2.
    The library's log lines go to `log_stream` (default stdout; benchmarks keep it for figures)."""
    configure_logging(log_stream)
    args = parser.parse_args()
    try:
        main(args)
    except UserError as exc:  # written for the user: one sentence, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
