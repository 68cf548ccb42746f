"""What the image and cluster files hold, read the way the static checks of both the VM launcher
(test_cluster_config.py) and KubeRay (test_kuberay.py) read them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What must never appear in a config, a manifest or the image: keys, secrets, auth tokens.
SECRET = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|RAY_AUTH_TOKEN=", re.IGNORECASE)


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def documented_image() -> str:
    """The image reference the Dockerfile tells the user to build and push."""
    match = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile's header must show its `docker build -t <image> .` command"
    return match.group(1)
