"""Static checks of the cluster definition: cluster.yaml, Dockerfile, .dockerignore, configs/cluster.yaml.

No AWS and no Docker engine: cluster.yaml goes through Ray's own offline validation (the
`prepare_config` + `validate_config` that `ray up` applies before it calls AWS), and the Dockerfile
is read as text. The image itself is not built by these tests.
"""

from __future__ import annotations

import copy
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from simpsons.config import load_config
from simpsons.storage import is_s3

ROOT = Path(__file__).resolve().parents[1]
PROFILE_ARN = re.compile(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+")
SECRET = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|RAY_AUTH_TOKEN=", re.IGNORECASE)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """cluster.yaml as `ray up` sees it: merged with Ray's AWS defaults and schema-validated."""
    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)
    return config


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def documented_image() -> str:
    """The image reference the Dockerfile tells the user to build and push."""
    match = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile's header must show its `docker build -t <image> .` command"
    return match.group(1)


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_passes_rays_offline_validation(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["idle_timeout_minutes"] > 0


def test_rays_validation_rejects_a_broken_cluster_yaml(cluster):
    # The check above can fail: a misspelt node-type field is refused by the same schema.
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_4x_a10g"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_training_runs_only_on_gpu_nodes_and_every_node_reaches_s3(prepared):
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    # The head offers nothing to the scheduler, so no training worker (or any task) lands there.
    assert types[head]["resources"] == {"CPU": 0, "GPU": 0}
    training = {name: spec for name, spec in types.items() if name != head}
    assert training and any(spec["max_workers"] > 0 for spec in training.values())
    for name, spec in training.items():
        assert spec["resources"].get("GPU", 0) >= 1, f"{name} runs training but offers no GPU"
        assert spec["min_workers"] <= spec["max_workers"], name
        assert PROFILE_ARN.fullmatch(spec["node_config"]["IamInstanceProfile"]["Arn"]), name
    # Ray creates an instance profile for the head only when none is given; the head exports
    # best/ to S3, so it has one too.
    assert PROFILE_ARN.fullmatch(types[head]["node_config"]["IamInstanceProfile"]["Arn"])


def test_cluster_runs_the_image_the_dockerfile_documents(prepared):
    image = documented_image()
    docker = prepared["docker"]
    assert docker["image"] == image
    assert docker.get("head_image", image) == image and docker.get("worker_image", image) == image
    for name, spec in prepared["available_node_types"].items():
        assert spec.get("docker", {}).get("worker_image", image) == image, name
    assert image.rsplit(":", 1)[1] == project_version(), "tag the image with the project version"


def test_cluster_is_locked_down_and_sized_for_nccl(prepared):
    docker = prepared["docker"]
    assert any(option.startswith("--shm-size") for option in docker["worker_run_options"])
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    assert prepared["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert not SECRET.search((ROOT / "cluster.yaml").read_text())


def test_cluster_job_config_fits_the_cluster(prepared):
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.train.use_gpu is True and cfg.train.workers > 1
    assert is_s3(cfg.run.storage) and is_s3(cfg.data.uri)
    assert cfg.train.max_failures >= 1
    assert cfg.optim.batch_size % cfg.train.workers == 0, "the global batch splits evenly over the workers"
    head = prepared["head_node_type"]
    usable = [spec for name, spec in prepared["available_node_types"].items() if name != head and spec["max_workers"] > 0]
    assert sum(spec["resources"]["GPU"] * spec["max_workers"] for spec in usable) >= cfg.train.workers
    for spec in usable:  # a node's GPU workers also get their CPUs
        assert spec["resources"]["GPU"] * cfg.train.cpus_per_worker <= spec["resources"]["CPU"]


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_pins_its_base_and_matches_torch_to_its_cuda():
    instructions = dockerfile_instructions()
    bases = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert len(bases) == 1
    pinned = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cu\d+)", bases[0])
    assert pinned, f"pin the base by Ray version, Python and CUDA, not {bases[0]}"
    assert pinned.group(1) == ray.__version__ and pinned.group(2) == "11"
    cuda = pinned.group(3)
    text = "\n".join(instructions)
    assert f"download.pytorch.org/whl/{cuda}" in text, f"torch wheels must be built for the base's {cuda}"
    tested = torch.__version__.split("+")[0]
    assert f"torch=={tested}" in text and "torchvision==" in text


def test_dockerfile_installs_the_project_after_its_dependencies_as_a_non_root_user():
    instructions = dockerfile_instructions()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(instructions) if re.search(pattern, line)]
        assert found, f"no instruction matches {pattern!r}"
        return found[0]

    deps = first(r"^COPY .*pyproject\.toml")
    deps_install = first(r"^RUN .*pip install .*-r ")
    source = first(r"^COPY .*simpsons/")
    project_install = first(r"^RUN .*pip install .*--no-deps \.(\s|$)")
    assert deps < deps_install < source < project_install, "dependency layers before the source, for caching"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert not SECRET.search((ROOT / "Dockerfile").read_text())
    assert "was not built" in (ROOT / "Dockerfile").read_text(), "say that the image was not built here"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins)."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        for candidate in {pattern, pattern.replace("**/", "")}:
            if fnmatch(path, candidate) or fnmatch(path, candidate + "/*"):
                ignored = not negated
    return ignored


def test_dockerignore_keeps_runs_caches_data_venv_and_secrets_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", "runs/local/best/checkpoint.pt", "data/simpsons_dataset/x.jpg",
                 "cache/packed/train_images.npy", ".git/HEAD", ".env", "simpsons/__pycache__/train.cpython-311.pyc"):
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker build"
    for line in dockerfile_instructions():
        if line.startswith("COPY "):
            for source in [token for token in line.split()[1:-1] if not token.startswith("--")]:
                probe = source.rstrip("/") + ("/module.py" if source.endswith("/") else "")
                assert not dockerignored(probe, patterns), f"the Dockerfile copies {source}; .dockerignore leaves it out"
