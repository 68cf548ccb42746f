"""The image's last build step, run here: it checks torch's CUDA build against torch_cuda.toml
and runs `pip check` on the installed project (a real pip, in this venv)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from image_files import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ARN = re.compile(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+")


def test_the_images_last_step_checks_the_torch_cuda_build_and_pip_check():
    last = dockerfile_instructions()[-1]
    assert last.startswith("RUN ") and "torch.version.cuda" in last and "${TORCH_CUDA}" in last
    assert re.search(r"&& pip check$", last), "the last step ends with `pip check`"
    # Run that step here, against this environment's torch, as `docker build` would run it: it
    # passes for the CUDA build installed here and fails the build for any other.
    installed = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    step = ["bash", "-c", last[len("RUN ") :]]
    done = subprocess.run(step, env=dict(env, TORCH_CUDA=installed), capture_output=True, text=True, timeout=300)
    if installed != "cpu":
        assert done.returncode == 0, done.stdout + done.stderr
        assert "No broken requirements found" in done.stdout
    other = "cu126" if installed != "cu126" else "cu130"
    done = subprocess.run(step, env=dict(env, TORCH_CUDA=other), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and f"not {other[2:-1]}.{other[-1]}" in done.stderr, done.stdout + done.stderr
