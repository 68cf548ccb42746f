"""Log lines as users read them: the library's messages plain, on stdout (or where a benchmark says)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO


def configure_logging(stream: TextIO | None = None) -> None:
    """The library logs, jobs print: messages of `simpsons.*` loggers go to `stream` (default
    stdout) as plain lines at INFO; other libraries' records keep the usual timestamped format.

    Ray workers call it too, so rank 0's lines reach the driver's output; benchmarks pass
    sys.stderr so that their stdout holds only figures.
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
