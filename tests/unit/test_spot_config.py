"""Offline checks of the spot options in cluster.yaml and deploy/k8s/ (docs/spot.md).

The watcher and drain commands the manifests run are parsed by simpsons.spot's own parser; the
spot node type is a RunInstances request botocore accepts (test_cluster_config.py checks every
node type that way); the head is never on spot on either launcher.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from simpsons.spot import get_args_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def spot_command(line: str):
    """The arguments of `python -m simpsons.spot ...` in a shell line, parsed by its own parser."""
    words = shlex.split(line)
    start = words.index("simpsons.spot") + 1
    end = next((i for i, w in enumerate(words) if i >= start and w in (">", "2>&1", "&")), len(words))
    return get_args_parser().parse_args([w.replace("$RAY_HEAD_IP", "10.0.0.1") for w in words[start:end]])


def test_every_vm_worker_starts_the_spot_watcher_against_the_head(cluster):
    (line,) = [c for c in cluster["worker_start_ray_commands"] if "simpsons.spot" in c]
    args = spot_command(line)
    assert args.command == "watch" and args.address == "10.0.0.1:6379" and args.metadata_url == ""
    assert line.startswith("nohup") and line.rstrip().endswith("&"), "in the background: the start commands go on"
    assert not any("simpsons.spot" in c for c in cluster["head_start_ray_commands"])


def test_the_spot_node_type_is_the_gpu_type_on_spot_and_the_head_never_is(cluster):
    types = cluster["available_node_types"]
    spot = {name: t for name, t in types.items() if t["node_config"].get("InstanceMarketOptions")}
    assert list(spot) == ["gpu_4x_a10g_spot"]
    twin = types["gpu_4x_a10g"]
    (spot_type,) = spot.values()
    assert spot_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot_type["resources"] == twin["resources"]
    assert spot_type["node_config"]["InstanceType"] == twin["node_config"]["InstanceType"]
    assert spot_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # the watcher speaks IMDSv2
    assert cluster["head_node_type"] not in spot


def _rayjob() -> dict:
    (job,) = [d for d in yaml.safe_load_all((DEPLOY / "rayjob-train.yaml").read_text()) if d]
    return job


def test_the_spot_worker_group_drains_its_node_before_kubernetes_stops_it():
    groups = {g["groupName"]: g for g in _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    spot, twin = groups["gpu-4x-spot"]["template"], groups["gpu-4x"]["template"]
    container = spot["spec"]["containers"][0]
    shell = container["lifecycle"]["preStop"]["exec"]["command"]
    assert shell[:2] == ["sh", "-c"]
    args = spot_command(shell[2].replace('"$FQ_RAY_IP:6379"', "head-svc:6379"))
    assert args.command == "drain" and args.wait and args.address == "head-svc:6379"
    # The pod stays for the drain's deadline and Ray's own stop after it.
    assert args.deadline_s + 10 <= spot["spec"]["terminationGracePeriodSeconds"]
    assert container["resources"] == twin["spec"]["containers"][0]["resources"]
    assert spot["spec"]["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"


def test_the_head_stays_off_spot_and_out_of_voluntary_evictions():
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    (term,) = head["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    refused = {e["key"]: e["values"] for e in term["matchExpressions"] if e["operator"] == "NotIn"}
    spot_group = next(
        g for g in _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-4x-spot"
    )
    # Every spot label the spot group selects or tolerates is one the head refuses.
    spot_spec = spot_group["template"]["spec"]
    labels = {k: v for k, v in spot_spec["nodeSelector"].items() if k != "node.kubernetes.io/instance-type"}
    labels |= {t["key"]: t["value"] for t in spot_spec["tolerations"] if t.get("value")}
    assert all(value in refused.get(key, []) for key, value in labels.items()), (labels, refused)
    assert head["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    (budget,) = [d for d in yaml.safe_load_all((DEPLOY / "spot-pdb.yaml").read_text()) if d]
    assert budget["kind"] == "PodDisruptionBudget" and budget["spec"]["maxUnavailable"] == 0
    selector = budget["spec"]["selector"]["matchLabels"]
    # KubeRay labels the head pod ray.io/node-type=head; the rest comes from the template.
    assert selector == {**head["metadata"]["labels"], "ray.io/node-type": "head"}
