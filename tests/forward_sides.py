"""Run a benchmark and record the image side every network it builds sees: what a timed step measures.

    python tests/forward_sides.py sides.json bench/throughput.py --quick ...

A global forward pre-hook on every first convolution (3 input channels) records the side of its
input; at exit the sides go to the JSON file as {"networks": [[side, ...] per network, in order]}.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
from pathlib import Path

import torch

seen: dict[int, list[int]] = {}  # id of a network's first convolution -> sides of its inputs


def _record(module, args):
    if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and args and args[0].dim() == 4:
        seen.setdefault(id(module), []).append(int(args[0].shape[-1]))


if __name__ == "__main__":
    out, script, *rest = sys.argv[1:]
    torch.nn.modules.module.register_module_forward_pre_hook(_record)
    atexit.register(lambda: Path(out).write_text(json.dumps({"networks": list(seen.values())})))
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
