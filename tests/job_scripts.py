"""Running the job scripts (jobs/*.py) the way a user does, from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(script: str, *args: object, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python jobs/<script> <args>` with this interpreter, its output captured as text."""
    command = [sys.executable, f"jobs/{script}", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
