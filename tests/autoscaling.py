"""Autoscaling clusters on one machine: Ray's own autoscaler with its fake multi-node provider.

`fake_cluster_config` writes the launcher config a head is started with (RayHead's
`autoscaling_config`), shaped like this project's clusters: a head that takes no training
(0 CPUs, as cluster.yaml and the KubeRay manifests have it) and a GPU-like worker type at 0
nodes that declares `simulated_gpu`, the stand-in for a GPU that `train.resources_per_worker`
asks for. The fake provider starts each node as local Ray processes with exactly those resources.
"""

from __future__ import annotations

import copy
import http.server
import json
import secrets
import ssl
import subprocess
import threading
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_STAND_IN = "simulated_gpu"
WORKER_TYPE = "gpu_group"


def fake_cluster_config(
    worker_cpus: int = 2, max_workers: int = 2, head_resources: dict | None = None, worker_extra: dict | None = None
) -> dict:
    """A launcher config for `ray start --head --autoscaling-config` with the fake provider.

    `worker_extra` adds to the worker type's resources, e.g. an object store larger than the
    machine, which makes every launch of the type fail (capacity that never comes)."""
    worker = {"CPU": worker_cpus, GPU_STAND_IN: 1, **(worker_extra or {})}
    return {
        "cluster_name": "fake-autoscaling",
        "max_workers": max_workers,
        "idle_timeout_minutes": 0.05,  # 3 s: idle nodes go away within the test
        "upscaling_speed": 1000,
        "provider": {
            "type": "fake_multinode",
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "use_node_id_as_ip": True,
        },
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": 0, **(head_resources or {})},
                "node_config": {},
                "max_workers": 0,
            },
            WORKER_TYPE: {"resources": worker, "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# ---------------------------------------------------------------------------------------------
# KubeRay: the RayCluster a driver on the head reads, served by a stand-in Kubernetes API


NAMESPACE, CLUSTER_NAME = "ml", "simpsons-train-x7k2p"


def ray_cluster_like_the_rayjob(max_workers: int = 2, worker_cpus: int = 2) -> dict:
    """The RayCluster KubeRay makes from deploy/k8s/rayjob-train.yaml, its GPU group turned into
    this machine's stand-in: `worker_cpus` CPUs and one `simulated_gpu` a pod, at most `max_workers`."""
    rayjob = yaml.safe_load((REPO / "deploy" / "k8s" / "rayjob-train.yaml").read_text())
    spec = copy.deepcopy(rayjob["spec"]["rayClusterSpec"])
    group = spec["workerGroupSpecs"][0]
    group.update(groupName=WORKER_TYPE, maxReplicas=max_workers)
    group["rayStartParams"] = {"num-cpus": str(worker_cpus), "resources": f'"{{\\"{GPU_STAND_IN}\\": 1}}"'}
    for container in group["template"]["spec"]["containers"]:
        for amounts in container["resources"].values():
            amounts.pop("nvidia.com/gpu", None)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": CLUSTER_NAME, "namespace": NAMESPACE},
        "spec": spec,
    }


class KubernetesApiStandIn:
    """An HTTPS server on 127.0.0.1 that answers what a KubeRay head's driver asks the Kubernetes
    API (GET its RayCluster, with the pod's service-account token), with a certificate of its own.

    The one thing that would leave this machine; `env` is what KubeRay and Kubernetes give the pod
    (RAY_CLUSTER_NAME, RAY_CLUSTER_NAMESPACE, KUBERNETES_SERVICE_*) plus the service-account folder."""

    def __init__(self, ray_cluster: dict, folder: Path):
        self.ray_cluster, self.requests = ray_cluster, []
        self.account = folder / "serviceaccount"
        self.account.mkdir(parents=True)
        self.token = secrets.token_hex(16)
        (self.account / "token").write_text(self.token)
        key, cert = folder / "key.pem", self.account / "ca.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                stand_in.requests.append(self.path)
                meta = stand_in.ray_cluster["metadata"]
                expected = f"/apis/ray.io/v1/namespaces/{meta['namespace']}/rayclusters/{meta['name']}"
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    self.send_error(401)
                elif self.path != expected:
                    self.send_error(404)
                else:
                    body = json.dumps(stand_in.ray_cluster).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            "RAY_CLUSTER_NAME": self.ray_cluster["metadata"]["name"],
            "RAY_CLUSTER_NAMESPACE": self.ray_cluster["metadata"]["namespace"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.server.server_address[1]),
            "SIMPSONS_K8S_SERVICE_ACCOUNT": str(self.account),
        }

    def __enter__(self) -> KubernetesApiStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
