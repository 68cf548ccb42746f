"""Start one Ray worker node joined to a head on 127.0.0.1 and block until killed (tests/ray_head.py).

What `ray start --address=<head> --block` does, through the same `ray._private.node.Node` it
calls, with one difference: `ray start` turns 127.0.0.1 (in --address and --node-ip-address)
into the machine's outward address when multi-node clusters are enabled, and aborts when they
are not, so it cannot join a head that listens on loopback only. This script keeps 127.0.0.1.

    python tests/ray_node.py '<json: gcs_address, temp_dir, num_cpus, resources, node_name, ports>'
"""

from __future__ import annotations

import json
import signal
import sys

import ray._private.node
import ray._private.parameter


def main(spec: dict) -> None:
    params = ray._private.parameter.RayParams(
        gcs_address=spec["gcs_address"],
        node_ip_address="127.0.0.1",
        temp_dir=spec["temp_dir"],
        num_cpus=spec["num_cpus"],
        num_gpus=0,
        resources=spec["resources"],
        node_name=spec["node_name"],
        min_worker_port=0,
        max_worker_port=0,  # random free ports for workers
        **spec["ports"],
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"Ray node {node.unique_id} joined {spec['gcs_address']}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})  # then Node's exit hook stops its processes


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(json.loads(sys.argv[1]))
