"""Run a Python script as a machine without some packages would: `import ray` (and the others) fails.

    python tests/without_packages.py ray,boto3,pyarrow bench/device_check.py --quick

A sys.meta_path finder answers for the blocked top-level packages before the installed ones are
found: importing them raises ImportError, as on a bare GPU machine where they are not installed,
and importlib.util.find_spec sees a spec with no origin (torch probes optional packages that way).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from pathlib import Path


class _Blocked(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"No module named {spec.name!r} (blocked by tests/without_packages.py)", name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise ImportError(module.__name__)


class BlockPackages(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, _Blocked())
        return None


def block(names: set[str]) -> None:
    """From now on, importing any of the top-level packages `names` in this process fails."""
    for name in list(sys.modules):
        if name.split(".")[0] in names:
            raise RuntimeError(f"{name} is already imported; block it before anything imports it.")
    sys.meta_path.insert(0, BlockPackages(names))


if __name__ == "__main__":
    blocked, script, *args = sys.argv[1:]
    block(set(blocked.split(",")))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` puts its folder first
    runpy.run_path(script, run_name="__main__")
