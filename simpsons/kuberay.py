"""What a driver on a KubeRay head can learn about its own cluster: the RayCluster object.

KubeRay's autoscaler is a sidecar of the head pod that reads the RayCluster from the Kubernetes
API; it reports nothing of its node types to Ray. A driver on the head (a RayJob's entrypoint, or
`ray job submit` to a RayCluster) reads the same object the same way: KubeRay names the cluster
in every Ray container (RAY_CLUSTER_NAME, RAY_CLUSTER_NAMESPACE), Kubernetes gives the pod its
service account's token, and the operator grants that account `get` on its RayCluster whenever
the in-tree autoscaler is on (the Role it makes for the autoscaler). The RayCluster becomes node
types through Ray's own conversion, the one the autoscaler itself runs, so the two agree.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from simpsons import ray_internals

# Where Kubernetes mounts a pod's service account (token, CA certificate). Tests point
# SIMPSONS_K8S_SERVICE_ACCOUNT at a folder of their own, beside a loopback stand-in API server.
SERVICE_ACCOUNT = Path(os.environ.get("SIMPSONS_K8S_SERVICE_ACCOUNT", "/var/run/secrets/kubernetes.io/serviceaccount"))


class KubeRayError(Exception):
    """The RayCluster could not be read; the message says why, in one clause."""


def cluster_name() -> tuple[str, str] | None:
    """(name, namespace) of the RayCluster this process runs in, or None outside KubeRay."""
    name, namespace = os.environ.get("RAY_CLUSTER_NAME", ""), os.environ.get("RAY_CLUSTER_NAMESPACE", "")
    return (name, namespace) if name and namespace else None


def read_ray_cluster(name: str, namespace: str, timeout_s: float = 10.0) -> dict:
    """The RayCluster object from the Kubernetes API, with the pod's service account."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT_HTTPS") or os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeRayError("KUBERNETES_SERVICE_HOST is not set, so the Kubernetes API is unknown")
    try:
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    except OSError as exc:
        raise KubeRayError(f"the pod's service account is not mounted ({exc.strerror}: {exc.filename})") from None
    host = f"[{host}]" if ":" in host else host
    url = f"https://{host}:{port}/apis/ray.io/v1/namespaces/{namespace}/rayclusters/{name}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise KubeRayError(
            f"the Kubernetes API answered {exc.code} {exc.reason} for rayclusters/{name} in {namespace}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise KubeRayError(f"the Kubernetes API at {host}:{port} did not answer ({exc})") from None


def autoscaling_config(ray_cluster: dict) -> dict | None:
    """The launcher-style config (available_node_types, max_workers) the autoscaler derives from
    the RayCluster, or None when the cluster has no in-tree autoscaler (its nodes are all there is)."""
    if not ray_cluster.get("spec", {}).get("enableInTreeAutoscaling"):
        return None
    ray_cluster = {**ray_cluster, "metadata": {"namespace": "default", **ray_cluster.get("metadata", {})}}
    return ray_internals.kuberay_autoscaling_config(ray_cluster)
