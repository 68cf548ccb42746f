"""The device check: the `gpu` tests, then bench/gpu.py, on this machine's first CUDA GPU.

    make device-check            # or: python bench/device_check.py

Figures on stdout, one a line (`name value`): gpu_tests_passed, gpu_tests_failed, then every
figure of bench/gpu.py (real sample, 128 px, per-GPU batch 512). Test output and notes go to
stderr. Without CUDA it prints one line `skipped ...` and exits 0. Within 8 minutes on one GPU:
the tests take a 5-minute limit (packing the real sample once, into bench/out/cache, is most of
it; the benchmark reuses it) and the benchmark a 3-minute one. Exit status 1 when a test failed
or the benchmark did not finish.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch  # noqa: E402
from common import REPO, emit, note, skip

TESTS_LIMIT_S = 300
BENCH_LIMIT_S = 180


def run_tests() -> tuple[int, int]:
    """(passed, failed) of tests/gpu/test_gpu.py; errors and timeouts count as failed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = f"{tmp}/junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/gpu/test_gpu.py",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            f"--timeout={TESTS_LIMIT_S}",
        ]
        try:
            subprocess.run(command, cwd=REPO, stdout=sys.stderr, timeout=TESTS_LIMIT_S + 30)
            suite = ET.parse(report).getroot()
        except (subprocess.TimeoutExpired, FileNotFoundError, ET.ParseError) as exc:
            note(f"the gpu tests did not finish: {exc}")
            return 0, 1
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
        return total - failed - errors - skipped, failed + errors


def main() -> int:
    if not torch.cuda.is_available():
        skip(
            "device check: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "run `make device-check` on a machine with an NVIDIA GPU."
        )
    note(f"device check on {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    passed, failed = run_tests()
    emit("gpu_tests_passed", passed, 0)
    emit("gpu_tests_failed", failed, 0)
    try:  # its figures go straight to our stdout, one a line
        bench = subprocess.run(
            [sys.executable, "bench/gpu.py", "--steps", "60", "--epochs", "1"], cwd=REPO, timeout=BENCH_LIMIT_S
        )
        bench_ok = bench.returncode == 0
    except subprocess.TimeoutExpired:
        note(f"bench/gpu.py did not finish within {BENCH_LIMIT_S} s")
        bench_ok = False
    return 0 if failed == 0 and passed > 0 and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
