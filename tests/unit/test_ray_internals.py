"""Every Ray internal the project uses (simpsons/ray_internals.py), checked against the installed Ray.

A Ray upgrade that moves or renames one of them fails here, by name.
"""

from __future__ import annotations

import dataclasses
import inspect

from ray._private import ray_constants, services
from ray._raylet import GcsClient, InnerGcsClient
from ray.autoscaler._private.util import format_readonly_node_type
from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest
from ray.core.generated import autoscaler_pb2, gcs_pb2
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.failure_handling.default import RETRYABLE_CONTROLLER_ERRORS

from simpsons import ray_internals


def test_the_autoscaler_status_key_and_the_read_only_node_type_are_rays():
    assert ray_internals.V1_STATUS_KEY == ray_constants.DEBUG_AUTOSCALING_STATUS
    assert ray_internals.readonly_node_type("abc123") == format_readonly_node_type("abc123")


def test_a_worker_group_start_timeout_is_recognised_and_retried_by_the_controller():
    """train.capacity_timeout_s relies on both: each start attempt times out, and is retried."""
    assert ray_internals.is_worker_group_start_timeout(WorkerGroupStartupTimeoutError(num_workers=2))
    assert (
        not ray_internals.is_worker_group_start_timeout(RuntimeError("other"))
        and WorkerGroupStartupTimeoutError in RETRYABLE_CONTROLLER_ERRORS
    )


def test_the_kuberay_conversion_gives_launcher_node_types():
    ray_cluster = {
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{"name": "h", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}}},
            "workerGroupSpecs": [
                {"groupName": "g", "minReplicas": 0, "maxReplicas": 3, "rayStartParams": {},
                 "template": {"spec": {"containers": [{"name": "w", "resources": {"limits": {"cpu": "8", "memory": "8Gi", "nvidia.com/gpu": "1"}}}]}}}
            ],
        },
    }  # fmt: skip
    config = ray_internals.kuberay_autoscaling_config(ray_cluster)
    assert config["max_workers"] == 3 and config["available_node_types"]["g"]["max_workers"] == 3
    assert {"CPU": 8, "GPU": 1} == {k: config["available_node_types"]["g"]["resources"][k] for k in ("CPU", "GPU")}


def test_autoscaler_v2s_status_names_launches_by_node_type():
    """cluster.autoscaler_state reads these fields of autoscaler v2's ClusterStatus (`ray up`'s default)."""
    assert {"pending_launches", "failed_launches"} <= {f.name for f in dataclasses.fields(ClusterStatus)}
    assert {"ray_node_type_name", "count"} <= {f.name for f in dataclasses.fields(LaunchRequest)}


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_gcs_calls_that_drain_a_preempted_node_are_rays():
    """simpsons.spot's calls, as `ray drain-node` makes them; test_spot.py drains a real node with them."""
    assert _parameters(services.canonicalize_bootstrap_address_or_die)[:1] == ["addr"]
    assert isinstance(GcsClient, type)  # a wrapper of InnerGcsClient, whose methods it passes on
    assert _parameters(InnerGcsClient.get_all_node_info)[:2] == ["self", "timeout"]
    assert _parameters(InnerGcsClient.drain_node)[:5] == [
        "self",
        "node_id",
        "reason",
        "reason_message",
        "deadline_timestamp_ms",
    ]
    assert {"state", "node_manager_address"} <= set(gcs_pb2.GcsNodeInfo.DESCRIPTOR.fields_by_name)
    assert gcs_pb2.GcsNodeInfo.ALIVE == gcs_pb2.GcsNodeInfo.GcsNodeState.Value("ALIVE")
    assert ray_internals.DRAIN_REASON in autoscaler_pb2.DrainNodeReason.keys()
