"""Offline checks of the KubeRay manifests in deploy/k8s/: no Kubernetes cluster, no operator.

Three layers, in the order a manifest meets them on a real cluster:
  schema    the API server: every RayJob / RayCluster / RayService against its KubeRay v1.7.0 CRD, read
            from ../shared/kuberay/v1.7.0/ beside the repo, with strict field validation emulated
            (an undeclared field is refused, not dropped); list-map keys unique; metadata, the
            embedded pod templates and plain Kubernetes objects against Kubernetes' own schemas
            (the kubernetes-validate package, which bundles them: no network);
  operator  the KubeRay operator's own checks before it acts (ray-operator/controllers/ray/utils/
            validation.go, v1.7): names, backoffLimit, deadlines, TTL, auth, Ray version, upgrade type;
  repo      the manifests agree with the project: the Dockerfile's image, WORKDIR and COPY lines,
            the Ray that pyproject.toml pins, the config each job runs, and for the RayService its
            Serve config (Ray's schema, simpsons.serve:app's own argument checks, GPUs, port).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from image_files import SECRET, dockerfile_instructions, documented_image
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from simpsons.cli import load_job_config
from simpsons.cluster import (
    START_TIMEOUT_VARIABLE,
    ClusterCapacity,
    addable_node_types,
    launcher_node_types,
    resolve_resources,
)
from simpsons.config import ConfigError, load_config, load_sweep, read_config_file
from simpsons.kuberay import autoscaling_config
from simpsons.storage import is_s3

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
KUBERAY = ROOT.parent / "shared" / "kuberay" / "v1.7.0"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# The oldest Kubernetes docs/kubernetes.md asks for, and the newest whose schemas kubernetes-validate holds.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# validation.go: 53 = 63 minus the longest service suffix ("-serve-svc"); a RayJob's or a RayService's
# cluster adds 6.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")  # validation.go, RayService
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# rayStartParams that state resources; validation.go refuses them beside a group's `resources`.
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# What is checked


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every YAML document under deploy/k8s/."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert found, f"no manifests under {DEPLOY}"
    return found


def the(kind: str) -> dict:
    (doc,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return doc


def cluster_spec(doc: dict) -> dict:
    return {"RayJob": lambda: doc["spec"]["rayClusterSpec"], "RayService": lambda: doc["spec"]["rayClusterConfig"]}.get(
        doc["kind"], lambda: doc["spec"]
    )()


def pod_templates(doc: dict) -> dict[str, dict]:
    """Group name ("head" for the head) -> the pod template KubeRay makes that group's pods from."""
    spec = cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in spec.get("workerGroupSpecs", [])})
    return templates


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


# ---------------------------------------------------------------------------------------------
# Layer 1: schemas


def strict(schema: dict) -> dict:
    """A structural schema as the API server applies it with strict field validation.

    Where a node declares `properties` and neither preserves unknown fields nor says what other
    keys may hold, an undeclared key is an error, not silently dropped.
    """
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


_CRD_SCHEMAS: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    """The strict v1 schema of a KubeRay kind, from the CRD file the operator v1.7.0 installs."""
    if kind not in _CRD_SCHEMAS:
        path = KUBERAY / CRD_FILES[kind]
        if not path.is_file():
            pytest.fail(f"{path} is missing; the KubeRay CRDs live in ../shared/kuberay/ beside the repo root.")
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 25k lines
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        _CRD_SCHEMAS[kind] = strict(version["schema"]["openAPIV3Schema"])
    return _CRD_SCHEMAS[kind]


def structural_problems(value, schema: dict, path: str = "") -> list[str]:
    """What the API server checks beyond JSON Schema, for the parts of `value` the schema covers.

    Duplicate keys in a list-map (two containers, env vars or ports with the same key) are refused;
    a CEL rule (x-kubernetes-validations) is not evaluated here, so touching one is reported.
    """
    problems = []
    if "x-kubernetes-validations" in schema:
        problems.append(f"{path or '/'}: has CEL rules this check does not evaluate")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                problems += structural_problems(item, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            problems += [f"{path}: duplicate key {key}" for key in {k for k in keys if keys.count(k) > 1}]
        for index, item in enumerate(value):
            problems += structural_problems(item, schema["items"], f"{path}[{index}]")
    return problems


def kubernetes_problems(obj: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"Kubernetes {version} {obj['kind']}: /{'/'.join(map(str, error.path))}: {error.message}"]
    return []


def schema_problems(doc: dict) -> list[str]:
    """Every reason the API server (strict field validation) would refuse `doc`; [] if none."""
    if doc.get("kind") not in CRD_FILES:
        return [problem for version in KUBERNETES_VERSIONS for problem in kubernetes_problems(doc, version)]
    schema = crd_schema(doc["kind"])
    problems = [
        f"/{'/'.join(map(str, error.path))}: {error.message}"
        for error in jsonschema.Draft4Validator(schema).iter_errors(doc)
    ]
    problems += structural_problems(doc, schema)
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion must be ray.io/v1, not {doc.get('apiVersion')}")
    # The CRD leaves metadata to the API server, which checks it as any ObjectMeta; and KubeRay's CRD
    # embeds the pod templates of the Kubernetes it was built with: check them against the cluster's.
    for version in KUBERNETES_VERSIONS:
        problems += kubernetes_problems(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}, version
        )
        for group, template in pod_templates(doc).items():
            problems += [
                f"{group}: {problem}"
                for problem in kubernetes_problems(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template},
                    version,
                )
            ]
    return problems


@pytest.mark.parametrize("name, doc", manifests(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_manifest_passes_the_schemas_with_strict_field_validation(name, doc):
    assert schema_problems(doc) == [], name


def rayjob_with(dotted: str, value) -> dict:
    """The RayJob with one field set (path in dots; `[n]` picks a list item)."""
    return with_field(copy.deepcopy(the("RayJob")), dotted, value)


def with_field(doc: dict, dotted: str, value) -> dict:
    """`doc` with one field set in place (path in dots; `[n]` picks a list item)."""
    *parents, leaf = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    target = doc
    for part in parents:
        target = target[int(part[1:-1])] if part.startswith("[") else target[part]
    target[leaf] = value
    return doc


@pytest.mark.parametrize(
    "dotted, value, complaint",
    [
        ("spec.backoffLimt", 2, "'backoffLimt' was unexpected"),  # misspelt field
        ("spec.rayClusterSpec.authOptions.mode", "tokens", "'tokens' is not one of"),  # wrong enum
        ("spec.backoffLimit", "2", "'2' is not of type 'integer'"),  # wrong type
        ("spec.rayClusterSpec.rayVersion", 2.6, "2.6 is not of type 'string'"),  # YAML's unquoted 2.60
        (
            "spec.rayClusterSpec.workerGroupSpecs.[0].template.spec.serviceAcountName",
            "x",
            "'serviceAcountName' was unexpected",
        ),
        (
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers.[0].resources.limit",
            {},
            "'limit' was unexpected",
        ),
    ],
)
def test_the_schema_check_refuses_a_misspelt_field_a_wrong_enum_and_a_wrong_type(dotted, value, complaint):
    problems = schema_problems(rayjob_with(dotted, value))
    assert any(complaint in problem for problem in problems), problems


def test_the_structural_checks_refuse_what_json_schema_lets_through():
    # Two env vars of one name: JSON Schema has no notion of list-map keys; the API server does.
    env = ray_container(pod_templates(the("RayJob"))["head"])["env"]
    doubled = rayjob_with("spec.rayClusterSpec.headGroupSpec.template.spec.containers.[0].env", env + env[:1])
    assert any("duplicate key" in problem for problem in schema_problems(doubled))
    # A field under a CEL rule is reported rather than passed unexamined.
    ruled = rayjob_with("spec.managedBy", "kueue.x-k8s.io/multikueue")
    assert any("CEL" in problem for problem in schema_problems(ruled))
    # Metadata goes through Kubernetes' ObjectMeta schema.
    labelled = rayjob_with("metadata.lables", {"team": "vision"})
    assert any("'lables' was unexpected" in problem for problem in schema_problems(labelled))


def test_kubernetes_pod_schema_refuses_what_the_crd_copy_of_it_might_not():
    # A pod-level field in a container: caught by Kubernetes' own PodTemplate schema.
    template = copy.deepcopy(pod_templates(the("RayJob"))["head"])
    ray_container(template)["serviceAccountName"] = "simpsons-ray"
    problems = kubernetes_problems(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
        KUBERNETES_VERSIONS[0],
    )
    assert problems and "serviceAccountName" in problems[0]


# ---------------------------------------------------------------------------------------------
# Layer 2: the operator's rules (validation.go, KubeRay v1.7)


def operator_problems(doc: dict) -> list[str]:
    """The KubeRay operator's checks of a RayJob / RayCluster that apply to these manifests."""
    kind, name, spec = doc["kind"], doc["metadata"].get("name", ""), doc["spec"]
    problems = []
    if len(name) > MAX_NAME[kind]:
        problems.append(f"{kind} name {name!r} is longer than {MAX_NAME[kind]} characters")
    if len(name) > 63 or not DNS_1035_LABEL.fullmatch(name):
        problems.append(
            f"{kind} name {name!r} is not a DNS-1035 label (lower case, digits, '-', starting with a letter)"
        )
    if kind == "RayJob":
        selector = spec.get("clusterSelector")
        backoff = spec.get("backoffLimit")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problems.append("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append("ttlSecondsAfterFinished must be >= 0")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if not selector and "rayClusterSpec" not in spec:
            problems.append("one of rayClusterSpec or clusterSelector must be set")
        if selector and not selector.get("ray.io/cluster"):
            problems.append("clusterSelector must name the cluster (ray.io/cluster)")
        if backoff is not None and backoff < 0:
            problems.append("backoffLimit must be >= 0")
        # A retry deletes the cluster and makes a new one: a RayJob on someone else's cluster
        # (clusterSelector) or one waiting for a hand submission (InteractiveMode) has none to remake.
        if backoff and selector:
            problems.append("backoffLimit retries on a fresh cluster; it does not go with clusterSelector")
        if backoff and mode == "InteractiveMode":
            problems.append("backoffLimit is incompatible with InteractiveMode")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            problems.append("activeDeadlineSeconds must be > 0")
    if kind == "RayService":
        upgrade = spec.get("upgradeStrategy", {}).get("type")
        if upgrade is not None and upgrade not in UPGRADE_TYPES:
            problems.append(f"upgradeStrategy.type {upgrade!r} is not one of {', '.join(UPGRADE_TYPES)}")
        if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
            problems.append("rayClusterDeletionDelaySeconds must be >= 0")
        if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            problems.append("a RayService's headService must not be named")
    if kind in ("RayCluster", "RayService") or "rayClusterSpec" in spec:
        problems += cluster_spec_problems(cluster_spec(doc))
    return problems


def cluster_spec_problems(spec: dict) -> list[str]:
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if not group["template"]["spec"].get("containers"):
            problems.append(f"group {name} has no container")
        if any(params.get(key) for key in RAY_START_RESOURCES) and group.get("resources"):
            problems.append(f"group {name} states resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"group {name}: rayStartParams['labels'] is not supported; use labels")
        # Not refused by the operator (it clamps), but a group outside its own bounds is a typo.
        if (
            name != "head"
            and not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        ):
            problems.append(f"group {name}: replicas must lie between minReplicas and maxReplicas")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = spec.get("rayVersion")
        if not version or Version(version) < Version("2.52.0"):
            problems.append(f"token authentication needs rayVersion >= 2.52.0, got {version!r}")
    return problems


# Every KubeRay object of deploy/k8s/, named by its file (the test id).
kuberay_objects = pytest.mark.parametrize(
    "name, doc",
    [(n, d) for n, d in manifests() if d["kind"] in CRD_FILES],
    ids=lambda value: value if isinstance(value, str) else "",
)


@kuberay_objects
def test_kuberay_objects_pass_the_operators_own_rules(name, doc):
    assert operator_problems(doc) == [], name


@pytest.mark.parametrize(
    "dotted, value, complaint",
    [
        ("spec.backoffLimit", -1, "backoffLimit must be >= 0"),
        ("spec.activeDeadlineSeconds", 0, "activeDeadlineSeconds must be > 0"),
        ("spec.clusterSelector", {"ray.io/cluster": "simpsons-sweeps"}, "does not go with clusterSelector"),
        ("spec.shutdownAfterJobFinishes", False, "needs shutdownAfterJobFinishes"),
        ("metadata.name", "simpsons_train", "not a DNS-1035 label"),
        ("metadata.name", "1-simpsons-train", "not a DNS-1035 label"),
        ("metadata.name", "simpsons-train-" + "x" * 33, "longer than 47"),
        ("spec.rayClusterSpec.rayVersion", "2.51.0", "needs rayVersion >= 2.52.0"),
    ],
)
def test_the_operator_rules_refuse_a_broken_rayjob(dotted, value, complaint):
    problems = operator_problems(rayjob_with(dotted, value))
    assert any(complaint in problem for problem in problems), problems


# ---------------------------------------------------------------------------------------------
# Layer 3: agreement with the repo


def dockerfile_workdir() -> str:
    workdirs = [line.split()[1] for line in dockerfile_instructions() if line.startswith("WORKDIR ")]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1]


def image_paths() -> dict[str, str]:
    """Repo path (file, or folder ending in /) -> where the Dockerfile's COPY lines put it in the image."""
    copied, workdir = {}, "/"
    for line in dockerfile_instructions():
        if line.startswith("WORKDIR "):
            workdir = line.split()[1]  # absolute in this Dockerfile; a COPY lands relative to the one in force
        elif line.startswith("COPY ") and "--from" not in line:
            *sources, dest = [token for token in line.split()[1:] if not token.startswith("--")]
            for source in sources:
                target = dest + source if dest.endswith("/") and not source.endswith("/") else dest
                copied[source] = (
                    target if target.startswith("/") else f"{workdir.rstrip('/')}/{target.removeprefix('./')}"
                )
    return copied


def path_in_image(path: str) -> str | None:
    """Where the repo file `path` is in the image, or None if the Dockerfile does not copy it."""
    for source, target in image_paths().items():
        if path == source:
            return target
        if source.endswith("/") and path.startswith(source):
            return target.rstrip("/") + "/" + path[len(source) :]
    return None


def entry_script(name: str):
    """The module of jobs/<name>.py, whose own parser reads the entrypoint's arguments."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_command(command: str) -> tuple[str, argparse.Namespace]:
    """(script path, parsed arguments) of `python jobs/x.py ...`, parsed by that script's own parser."""
    python, script, *args = shlex.split(command)
    assert python == "python" and script.startswith("jobs/"), command
    return script, entry_script(Path(script).stem).get_args_parser().parse_args(args)


def pinned_ray() -> SpecifierSet:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [dep for dep in dependencies if re.match(r"ray(\[|[<>=!~ ]|$)", dep)]
    return SpecifierSet(re.sub(r"^ray(\[[^\]]*\])?", "", ray))


def image_ray() -> str:
    """The Ray version of the image's base (rayproject/ray:<version>-...)."""
    base = [line.split()[1] for line in dockerfile_instructions() if line.startswith("FROM ")][-1]
    return re.search(r":(\d+\.\d+\.\d+)", base).group(1)


def gpu_capacity(spec: dict, cpus_per_worker: float) -> tuple[int, list[str]]:
    """(GPUs the worker groups reach at maxReplicas, problems of pods short of CPUs for their GPUs)."""
    gpus, problems = 0, []
    for group in spec["workerGroupSpecs"]:
        limits = ray_container(group["template"])["resources"]["limits"]
        gpus += int(limits.get(GPU, 0)) * group["maxReplicas"]
        if int(limits.get(GPU, 0)) * cpus_per_worker > float(limits["cpu"]):
            problems.append(
                f"group {group['groupName']}: {limits.get(GPU)} GPU workers x {cpus_per_worker:g} CPUs "
                f"do not fit its {limits['cpu']} CPUs"
            )
    return gpus, problems


def repo_problems(doc: dict) -> list[str]:
    """How a RayJob / RayCluster disagrees with the Dockerfile, pyproject.toml, cluster.yaml and the
    service account manifest; for a RayJob, also with the config its entrypoint runs."""
    spec, problems = cluster_spec(doc), []
    if spec["rayVersion"] not in pinned_ray():
        problems.append(f"rayVersion {spec['rayVersion']} is not the Ray pyproject.toml pins ({pinned_ray()})")
    if spec["rayVersion"] != image_ray():
        problems.append(f"rayVersion {spec['rayVersion']}, but the image is built on Ray {image_ray()}")
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append('the head takes no training: rayStartParams num-cpus "0"')
    if spec.get("enableInTreeAutoscaling") is not True or spec.get("authOptions") != {"mode": "token"}:
        problems.append("in-tree autoscaling and token authOptions are both on")
    if not spec.get("workerGroupSpecs") or any(group["minReplicas"] != 0 for group in spec["workerGroupSpecs"]):
        problems.append("GPU worker groups scale from zero (minReplicas 0)")
    account = the("ServiceAccount")["metadata"]["name"]
    for group, template in pod_templates(doc).items():
        pod, container = template["spec"], ray_container(template)
        if any(c["image"] != documented_image() for c in pod["containers"]):
            problems.append(f"{group}: run the image the Dockerfile documents, {documented_image()}")
        if pod.get("serviceAccountName") != account:
            problems.append(f"{group}: S3 comes through the service account {account}")
        memory = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in memory for m in container.get("volumeMounts", [])):
            problems.append(f"{group}: /dev/shm must be a memory-backed volume")
        if (GPU in container["resources"]["limits"]) != (group != "head"):
            problems.append(f"{group}: GPUs on the workers only")
    if doc["kind"] == "RayJob":
        problems += rayjob_problems(doc)
    if doc["kind"] == "RayService":
        problems += rayservice_problems(doc)
    return problems


def rayjob_problems(job: dict) -> list[str]:
    problems = []
    script, args = job_command(job["spec"]["entrypoint"])
    # The job driver runs on the head from where `ray start` ran: the container's working directory.
    if ray_container(pod_templates(job)["head"]).get("workingDir", dockerfile_workdir()) != dockerfile_workdir():
        problems.append(f"the head's workingDir must be the Dockerfile's WORKDIR {dockerfile_workdir()}")
    for path in filter(None, (script, args.config)):
        if not (ROOT / path).is_file() or path_in_image(path) != f"{dockerfile_workdir()}/{path}":
            problems.append(f"{path} is not a repo file that the Dockerfile copies into its WORKDIR")
    if problems:
        return problems
    cfg = load_job_config(argparse.Namespace(**{**vars(args), "config": args.config and str(ROOT / args.config)}))
    gpus, short = gpu_capacity(job["spec"]["rayClusterSpec"], cfg.train.cpus_per_worker)
    problems += short
    if cfg.train.use_gpu is not True or gpus < cfg.train.workers:
        problems.append(
            f"{cfg.train.workers} GPU workers need GPUs x maxReplicas >= {cfg.train.workers}; the groups reach {gpus}"
        )
    # A retry runs on a fresh cluster: it resumes only from storage the cluster does not own, under
    # a name the config states rather than one made up per run.
    if not (is_s3(cfg.run.storage) and is_s3(cfg.data.uri)):
        problems.append("run.storage and data.uri must be in S3 for a retry on a fresh cluster to resume")
    if not args.config or "name" not in read_config_file(ROOT / args.config).get("run", {}):
        problems.append("the config the job runs must state run.name, so that a retry resumes the same run")
    if not job["spec"].get("backoffLimit") or not job["spec"].get("activeDeadlineSeconds"):
        problems.append("backoffLimit (retries) and activeDeadlineSeconds (a bound on the whole job) are set")
    if not 0 < job["spec"].get("preRunningDeadlineSeconds", 0) <= 1800:
        problems.append("preRunningDeadlineSeconds (at most 30 min) fails a cluster that never gets running")
    variables = {v["name"] for t in pod_templates(job).values() for v in ray_container(t).get("env", [])}
    if START_TIMEOUT_VARIABLE in variables:
        problems.append(f"{START_TIMEOUT_VARIABLE} comes from the config's train.capacity_timeout_s, not the pods")
    if job["spec"].get("shutdownAfterJobFinishes") is not True or "ttlSecondsAfterFinished" not in job["spec"]:
        problems.append("the cluster is deleted after the job: shutdownAfterJobFinishes and ttlSecondsAfterFinished")
    return problems


SERVE_PORT = 8000  # Serve's HTTP proxy; KubeRay's serve service routes to the container port named "serve"


def rayservice_problems(service: dict) -> list[str]:
    """How a RayService's Serve config disagrees with Ray's schema, simpsons.serve:app and its cluster."""
    from ray.serve.schema import ServeDeploySchema

    problems = []
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    except Exception as error:  # pydantic's ValidationError, or YAML that is not a mapping
        return [f"serveConfigV2 is not a Serve config Ray 2.60 accepts: {error}"]
    spec = cluster_spec(service)
    for application in config.applications:
        module, _, attribute = application.import_path.partition(":")
        source = module.replace(".", "/") + ".py"
        if not (ROOT / source).is_file() or path_in_image(source) != f"{dockerfile_workdir()}/{source}":
            problems.append(f"{application.import_path}: {source} is not a repo file that the Dockerfile copies")
            continue
        builder = getattr(importlib.import_module(module), attribute, None)
        try:
            builder(dict(application.args))  # the builder's own checks; builds, deploys nothing
        except (TypeError, ValueError) as error:
            problems.append(f"{application.import_path} refuses its args: {error}")
            continue
        args = application.args
        if not is_s3(str(args.get("checkpoint", ""))):
            problems.append("the checkpoint must be in S3: a new cluster's pods share no disk with anyone")
        if application.route_prefix != "/":
            problems.append("the application answers at route_prefix / (POST /predict, GET /healthz)")
        gpus, _ = gpu_capacity(spec, 1)
        if str(args.get("gpu")) == "true" and gpus < int(args.get("max_replicas", 1)):
            problems.append(f"max_replicas {args.get('max_replicas')} GPU replicas, but the groups reach {gpus} GPUs")
    for group, template in pod_templates(service).items():
        ports = {(p.get("name"), p["containerPort"]) for p in ray_container(template).get("ports", [])}
        if ("serve", SERVE_PORT) not in ports:
            problems.append(f"{group}: the container declares the port serve: {SERVE_PORT} (Serve's HTTP proxy)")
    return problems


def rayservice_with(dotted: str, value) -> dict:
    """The RayService with one field set (as rayjob_with); `serve.<key>` sets an application arg."""
    doc = copy.deepcopy(the("RayService"))
    if dotted.startswith("serve."):
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        key = dotted.removeprefix("serve.")
        target = config["applications"][0]
        if key.startswith("args."):
            target = target["args"]
            key = key.removeprefix("args.")
        target[key] = value
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        return doc
    return with_field(doc, dotted, value)


@pytest.mark.parametrize(
    "dotted, value, complaint",
    [
        ("serve.import_path", "simpsons.serving:app", "simpsons/serving.py is not a repo file"),
        ("serve.args.checkpont", "s3://b/best", "refuses its args"),
        ("serve.args.checkpoint", "runs/local/best", "must be in S3"),
        ("serve.args.max_replicas", 5, "the groups reach 4 GPUs"),
        ("serve.route_prefix", "/simpsons", "route_prefix /"),
        ("serve.deployments", [{"name": "Classifier", "num_replicas": "many"}], "not a Serve config"),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.[0].ports", [], "the port serve"),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.serviceAccountName", "default", "service account"),
    ],
)
def test_the_repo_checks_refuse_a_rayservice_that_disagrees_with_the_app(dotted, value, complaint):
    problems = repo_problems(rayservice_with(dotted, value))
    assert any(complaint in problem for problem in problems), problems


def test_the_operator_rules_refuse_a_broken_rayservice():
    assert operator_problems(rayservice_with("metadata.name", "simpsons-serve-" + "x" * 33))
    assert any(
        "upgradeStrategy" in p for p in operator_problems(rayservice_with("spec.upgradeStrategy", {"type": "Blue"}))
    )
    assert any(
        "misspelt" in p or "'serveConfig' was unexpected" in p
        for p in schema_problems(rayservice_with("spec.serveConfig", "x"))
    )


@kuberay_objects
def test_kuberay_objects_agree_with_the_dockerfile_pyproject_and_the_config_they_run(name, doc):
    assert repo_problems(doc) == [], name


def test_the_rayjob_runs_the_training_entrypoint_with_the_cluster_config():
    script, args = job_command(the("RayJob")["spec"]["entrypoint"])
    assert (script, args.config) == ("jobs/train.py", "configs/cluster.yaml")


@pytest.mark.parametrize(
    "dotted, value, complaint",
    [
        (
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers.[0].image",
            "rayproject/ray:2.60.0",
            "the image the Dockerfile",
        ),
        ("spec.rayClusterSpec.rayVersion", "2.59.0", "not the Ray pyproject.toml pins"),
        ("spec.rayClusterSpec.headGroupSpec.rayStartParams", {}, "head takes no training"),
        (
            "spec.entrypoint",
            "python jobs/train.py --config configs/clusters.yaml",
            "configs/clusters.yaml is not a repo file",
        ),
        ("spec.entrypoint", "python bench/accuracy.py", "bench/accuracy.py"),
        (
            "spec.entrypoint",
            "python jobs/train.py --config configs/cluster.yaml --set run.storage=/tmp/runs",
            "must be in S3",
        ),
        (
            "spec.entrypoint",
            "python jobs/train.py --config configs/cluster.yaml --set train.workers=12",
            "the groups reach 8",
        ),
        ("spec.rayClusterSpec.workerGroupSpecs.[0].maxReplicas", 1, "the groups reach 4"),
        ("spec.rayClusterSpec.workerGroupSpecs.[0].template.spec.volumes", [], "/dev/shm"),
        ("spec.rayClusterSpec.headGroupSpec.template.spec.containers.[0].workingDir", "/home/ray", "workingDir"),
        ("spec.backoffLimit", 0, "backoffLimit (retries)"),
        ("spec.preRunningDeadlineSeconds", 0, "preRunningDeadlineSeconds"),
        (
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers.[0].env",
            [{"name": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "value": "900"}],
            "train.capacity_timeout_s",
        ),
    ],
)
def test_the_repo_checks_refuse_a_rayjob_that_disagrees_with_the_repo(dotted, value, complaint):
    try:
        problems = repo_problems(rayjob_with(dotted, value))
    except AssertionError as error:  # job_command refuses an entrypoint that is not `python jobs/...`
        problems = [str(error)]
    assert any(complaint in problem for problem in problems), problems


def test_s3_access_comes_from_the_service_accounts_role_and_no_manifest_holds_a_secret():
    role = the("ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role)
    for path in DEPLOY.glob("*.yaml"):
        assert not SECRET.search(path.read_text()), f"{path.name} holds a secret"


def head_resources(doc: dict) -> dict:
    """The custom resources a head advertises: rayStartParams' JSON, as the shell passes it to `ray start`."""
    raw = cluster_spec(doc)["headGroupSpec"]["rayStartParams"].get("resources")
    return json.loads(shlex.split(raw)[0]) if raw else {}


def sweep_command(doc_path: Path) -> str:
    """The `python jobs/tune.py ...` command the RayCluster's header tells the user to submit."""
    header = "\n".join(line.lstrip("# ") for line in doc_path.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"-- (python jobs/tune\.py(?:[^\n]*\\\n)*[^\n]*)", header)
    assert match, f"{doc_path.name} shows no `ray job submit ... -- python jobs/tune.py` command"
    return match.group(1).replace("\\\n", " ")


def test_the_sweep_cluster_puts_trial_drivers_on_the_head_and_fits_its_submit_command():
    cluster = the("RayCluster")
    drivers = head_resources(cluster)
    assert drivers.get("trial_driver", 0) >= 1
    # The same scheme as the VM cluster: whatever custom resource its head advertises, this one does.
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for resource, amount in launcher["available_node_types"][launcher["head_node_type"]]["resources"].items():
        if resource not in ("CPU", "GPU"):
            assert drivers.get(resource) == amount, f"cluster.yaml's head advertises {resource}: {amount}"
    # The documented command parses (the file's training sections, then --set, as jobs/tune.py
    # loads them), and what it asks for fits the cluster.
    script, args = job_command(sweep_command(DEPLOY / "raycluster-sweeps.yaml"))
    assert script == "jobs/tune.py"
    cfg = load_sweep(ROOT / args.config, args.set)
    assert cfg.train.use_gpu is True and is_s3(cfg.run.storage) and is_s3(cfg.data.uri)
    assert 1 <= cfg.tune.max_concurrent_trials <= drivers["trial_driver"]
    gpus, short = gpu_capacity(cluster_spec(cluster), cfg.train.cpus_per_worker)
    assert short == [] and cfg.tune.max_concurrent_trials * cfg.train.workers <= gpus


def test_the_driver_reads_the_shipped_rayjobs_node_types_as_kuberays_autoscaler_does():
    """The RayCluster a RayJob makes, through Ray's own conversion (the one the KubeRay autoscaler
    runs; a private Ray module, so a Ray upgrade that moves it fails here): the GPU group's pods,
    and the config the job runs fits them with nothing running yet, and not with one worker more."""
    ray_cluster = {"metadata": {"name": "simpsons-train-abcde"}, "spec": the("RayJob")["spec"]["rayClusterSpec"]}
    types, limit = launcher_node_types(autoscaling_config(ray_cluster))
    assert [(t.name, t.resources["CPU"], t.resources["GPU"], t.addable) for t in types] == [
        ("gpu-4x", 44.0, 4.0, 2),
        ("gpu-4x-spot", 44.0, 4.0, 0),  # off until a user switches to spot (docs/spot.md)
    ]
    assert limit == 2
    types, room = addable_node_types(types, limit, live_workers=[])
    head = ClusterCapacity(nodes=[{"memory": 1e10}], other_nodes=0, node_types=types, max_added=room)
    cfg = resolve_resources(load_config(ROOT / "configs" / "cluster.yaml"), head)
    assert cfg.train.use_gpu is True and cfg.train.workers == 8
    with pytest.raises(ConfigError, match="can hold 8"):
        resolve_resources(load_config(ROOT / "configs" / "cluster.yaml", ["train.workers=9"]), head)
    # Without the in-tree autoscaler the pods that exist are all there is.
    fixed = {**ray_cluster, "spec": {**ray_cluster["spec"], "enableInTreeAutoscaling": False}}
    assert autoscaling_config(fixed) is None
