"""Spot reclaim notices -> a Ray drain with the preemption reason and the notice's deadline.

Ray Train saves a just-in-time checkpoint and charges the restart to its preemption budget only
when the GCS knows that a node is going (`ray.train.get_preemption_info()` reports nodes drained
with DRAIN_NODE_REASON_PREEMPTION). Neither the VM launcher nor KubeRay tells it when a spot
instance is reclaimed; this module does, from the node that is going (docs/spot.md):

    python -m simpsons.spot watch                 # each VM worker node, started by cluster.yaml
    python -m simpsons.spot drain --deadline-s 100 --wait    # a Kubernetes pod's preStop hook

`watch` polls the EC2 instance metadata service (IMDSv2: a PUT for a session token, then
GET /latest/meta-data/spot/instance-action: 404 until EC2 schedules the reclaim, then
{"action": "terminate", "time": "2026-12-06T18:22:00Z"}, two minutes ahead) and on a notice
drains this Ray node with the notice's time as the deadline. `drain` drains it at once with a
deadline `--deadline-s` from now and, with `--wait`, stays until then so that Kubernetes keeps
the pod (it stops the container when the hook returns).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime

from simpsons import ray_internals

_logger = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"  # EC2's instance metadata; AWS_EC2_METADATA_SERVICE_ENDPOINT overrides
TOKEN_TTL_S = 21600  # IMDSv2 session tokens live at most 6 h; a 401 fetches a new one
POLL_S = 5.0  # EC2 posts the notice 2 min ahead and asks for polls every 5 s


class InstanceMetadata:
    """The two IMDSv2 calls the watcher needs, each bounded by `timeout` seconds."""

    def __init__(self, url: str = "", timeout: float = 2.0):
        self.url = (url or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or METADATA_URL).rstrip("/")
        self.timeout = timeout
        self._token = ""

    def _token_now(self) -> str:
        if not self._token:
            request = urllib.request.Request(
                f"{self.url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self._token = response.read().decode()
        return self._token

    def spot_action(self) -> dict | None:
        """The spot interruption notice ({"action", "time"}), or None while there is none."""
        for attempt in range(2):
            request = urllib.request.Request(
                f"{self.url}/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": self._token_now()},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code == 401 and attempt == 0:  # the token expired: fetch a new one, once
                    self._token = ""
                    continue
                raise
        return None


def deadline_of(notice: dict) -> float:
    """The notice's reclaim time as UNIX seconds ("time": ISO 8601 in UTC, "2026-12-06T18:22:00Z")."""
    return datetime.fromisoformat(notice["time"].replace("Z", "+00:00")).timestamp()


def watch(
    metadata: InstanceMetadata,
    on_notice: Callable[[float, dict], None],
    poll_s: float = POLL_S,
    polls: int | None = None,
) -> bool:
    """Poll for a spot notice every `poll_s` and call on_notice(deadline, notice) on the first;
    True once it was called, False after `polls` polls without one (None: poll until a notice).

    An unreachable or failing metadata service is logged and polled again: the watcher must
    outlive a hiccup, and the node trains on whatever it says."""
    done = 0
    while polls is None or done < polls:
        try:
            notice = metadata.spot_action()
        except (OSError, ValueError) as exc:  # URLError, timeouts, a body that is not JSON
            _logger.warning("Could not read the spot notice from %s: %s", metadata.url, exc)
            notice = None
        done += 1
        if notice is not None:
            on_notice(deadline_of(notice), notice)
            return True
        if polls is None or done < polls:
            time.sleep(poll_s)
    return False


# ---------------------------------------------------------------------------------------------
# Ray: which node this is, and the drain (the GCS calls themselves are in simpsons.ray_internals)


def own_node_id(client, ip: str | None = None, wait_s: float = 60) -> str:
    """The hex id of the live Ray node on this machine (found by its IP address), waiting up to
    `wait_s` for a node that `ray start` has just started to register."""
    ip = ip or _node_ip()
    give_up = time.monotonic() + wait_s
    while True:
        alive = [node_id for node_id, node_ip in ray_internals.live_node_ips(client).items() if node_ip == ip]
        if len(alive) == 1:
            return alive[0]
        if len(alive) > 1 or time.monotonic() > give_up:
            raise RuntimeError(f"Expected one live Ray node at {ip}, found {len(alive)}; pass --node-id.")
        time.sleep(1)


def _node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def drain(client, node_id: str, deadline: float, message: str) -> None:
    """Tell the GCS that `node_id` is being preempted and goes at `deadline` (UNIX seconds): Ray
    schedules nothing new there and Ray Train's watcher sees the drain."""
    accepted, why = ray_internals.drain_as_preempted(client, node_id, message, int(deadline * 1000))
    if not accepted:
        raise RuntimeError(f"The GCS refused to drain node {node_id}: {why}")
    _logger.warning(
        "Drained Ray node %s as preempted, %.0f s before its deadline: %s", node_id, deadline - time.time(), message
    )


# ---------------------------------------------------------------------------------------------
# Command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simpsons.spot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="the GCS, host:port (default: the cluster this node joined)")
    parser.add_argument("--node-id", default="", help="the Ray node to drain (default: the one at this machine's IP)")
    commands = parser.add_subparsers(dest="command", required=True)
    watch_cmd = commands.add_parser("watch", help="drain this node when EC2 posts a spot interruption notice")
    watch_cmd.add_argument(
        "--metadata-url", default="", help=f"default: $AWS_EC2_METADATA_SERVICE_ENDPOINT or {METADATA_URL}"
    )
    watch_cmd.add_argument("--poll-s", type=float, default=POLL_S)
    drain_cmd = commands.add_parser("drain", help="drain this node now, going in --deadline-s seconds")
    drain_cmd.add_argument("--deadline-s", type=float, required=True)
    drain_cmd.add_argument("--wait", action="store_true", help="return at the deadline, not at once")
    drain_cmd.add_argument("--reason", default="the pod is being terminated")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    client = ray_internals.gcs_client(args.address)
    node_id = args.node_id or own_node_id(client)
    host = socket.gethostname()
    if args.command == "watch":
        _logger.info("Watching %s for a spot interruption notice to Ray node %s.", args.metadata_url or "EC2", node_id)

        def on_notice(deadline: float, notice: dict) -> None:
            drain(client, node_id, deadline, f"spot {notice.get('action', 'reclaim')} of {host} at {notice['time']}")

        watch(InstanceMetadata(args.metadata_url), on_notice, args.poll_s)
        return 0
    deadline = time.time() + args.deadline_s
    drain(client, node_id, deadline, f"{args.reason} ({host})")
    if args.wait:
        time.sleep(max(0.0, deadline - time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
