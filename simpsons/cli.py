"""What every job in jobs/ shares: config from arguments, dataset resolution, clean error exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TextIO

from simpsons.config import Config, ConfigError, load_config


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


def resolve_dataset(cfg: Config) -> str:
    """The packed dataset the run trains on: `data.uri`, or `data.source` prepared into the cache."""
    if cfg.data.uri:
        return cfg.data.uri
    from simpsons.prepare import cached_pack
    from simpsons.sources import fetch_source

    d = cfg.data
    tree = fetch_source(d.source, d.cache_dir, max_image_bytes=d.max_image_bytes)
    return str(cached_pack(tree, d.cache_dir, d.stored_size, d.pack_workers, d.classes, d.max_image_bytes))


def check_inputs(cfg: Config, dataset_uri: str | None = None) -> None:
    """What a job can refuse in seconds, before Ray starts and data is prepared: the run's storage
    (reachable, bucket exists, writable), the MLflow tracking server (with run.tracking_uri set) and
    a raw data source that cannot exist (when neither `dataset_uri` nor data.uri names a packed dataset)."""
    from simpsons import tracking
    from simpsons.sources import check_source
    from simpsons.storage import check_writable

    check_writable(cfg.run.storage, cfg.run.s3_endpoint)
    tracking.check(cfg)
    if not (dataset_uri or cfg.data.uri):
        check_source(cfg.data.source)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is written for the user: printed as one sentence, no traceback."""
    from simpsons.cluster import CapacityError
    from simpsons.data import DataError
    from simpsons.sources import SourceError
    from simpsons.storage import StorageError

    return (ConfigError, CapacityError, DataError, SourceError, StorageError)


def configure_logging(stream: TextIO | None = None) -> None:
    """The library logs, jobs print: messages of `simpsons.*` loggers go to `stream` (default
    stdout) as plain lines at INFO; other libraries' records keep the usual timestamped format.

    Benchmarks pass sys.stderr so that their stdout holds only figures.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("simpsons")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_job(
    main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, log_stream: TextIO | None = None
) -> None:
    """Parse arguments and run `main`; a user error becomes one line on stderr and exit status 2.
    The library's log lines go to `log_stream` (default stdout; benchmarks keep it for figures)."""
    configure_logging(log_stream)
    args = parser.parse_args()
    try:
        main(args)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
