"""The parts of Ray this project uses that Ray does not publish, in one place.

Each may move in any Ray release; tests/test_ray_internals.py checks every one against the
installed Ray, so an upgrade that moves one fails there, by name, not somewhere in a job.
"""

from __future__ import annotations

import json


def kuberay_autoscaling_config(ray_cluster: dict) -> dict:
    """The launcher-style config KubeRay's autoscaler derives from a RayCluster object."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(ray_cluster)


def is_worker_group_start_timeout(error: BaseException | None) -> bool:
    """Whether a Train controller failure is a worker group that did not start in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(error, WorkerGroupStartupTimeoutError)


# Where the v1 autoscaler (KubeRay's default, `ray start --autoscaling-config`) writes its status
# every update, what `ray status` reads (ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS).
V1_STATUS_KEY = "__autoscaling_status"


def v1_autoscaler_report() -> dict | None:
    """The v1 autoscaler's last report (pending launches, failed nodes, node types of the live
    nodes), or None when none runs or only the read-only one of a head started without a config."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(V1_STATUS_KEY)
    report = json.loads(raw).get("autoscaler_report") if raw else None
    mapping = (report or {}).get("node_type_mapping") or {}
    if mapping and all(kind == readonly_node_type(node) for node, kind in mapping.items()):
        return None  # the read-only autoscaler names every node's type after the node and adds nothing
    return report or None


def readonly_node_type(node_id: str) -> str:
    """The node type Ray's read-only autoscaler gives a node (ray.autoscaler._private.util)."""
    return f"node_{node_id}"
