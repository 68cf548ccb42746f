"""The parts of Ray this project uses that Ray does not publish, in one place.

Each may move in any Ray release; tests/unit/test_ray_internals.py checks every one against the
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


# The GCS calls of simpsons.spot: what `ray drain-node` does (ray/scripts/scripts.py), whose
# client and messages Ray does not publish.
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # what ray.train.get_preemption_info() reports


def gcs_client(address: str | None):
    """A client of the cluster's GCS: `address` (host:port), or the cluster this machine's `ray
    start` joined (RAY_ADDRESS, then the address file `ray start` leaves in Ray's temp dir)."""
    from ray._private import services
    from ray._raylet import GcsClient

    return GcsClient(address=services.canonicalize_bootstrap_address_or_die(address))


def live_node_ips(client) -> dict[str, str]:
    """The hex id of every live node -> its IP address."""
    from ray.core.generated import gcs_pb2

    return {
        node_id.hex(): node.node_manager_address
        for node_id, node in client.get_all_node_info(timeout=30).items()
        if node.state == gcs_pb2.GcsNodeInfo.ALIVE
    }


def drain_as_preempted(client, node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
    """Ask the GCS to drain `node_id` as preempted, going at `deadline_ms` (UNIX milliseconds):
    (accepted, why not)."""
    from ray.core.generated import autoscaler_pb2

    return client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON), message, deadline_ms)
