"""The Ray cluster a job runs on: joining or starting it, what it can hold, and the driver's checks.

`init_ray` is the one way every job, sweep, benchmark and test fixture reaches Ray. `prepare_run`
is what the driver checks before anything travels to a worker: paths made absolute, local folders
refused on a multi-node cluster, resources resolved against the nodes (live ones and the ones the
autoscaler may add) and a placement that can never happen refused in one sentence.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import ray

from simpsons import storage
from simpsons.config import Config, ConfigError, from_dict, resolve_paths, to_dict

# Where the cluster launcher (`ray up`) puts its config on the head node.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass
class ClusterCapacity:
    """The Ray cluster's nodes and what its autoscaler may add (nothing on a plain `ray.init()`)."""

    # Total resources of every live node, e.g. {"CPU": 48.0, "GPU": 4.0}; busy ones included,
    # since they are freed again: only what can never exist makes a run impossible.
    nodes: list[dict[str, float]]
    # Live nodes other than the driver's (Ray Train workers may land on any of them).
    other_nodes: int
    # Autoscaler node types: (name, resources of one node, nodes of the type it may start).
    node_types: list[tuple[str, dict[str, float], int]] = field(default_factory=list)
    # The autoscaler's limit on worker nodes of all types together (None: no limit given).
    max_added: int | None = None

    def can_add_nodes(self) -> bool:
        return any(count > 0 for _, _, count in self.node_types) and self.max_added != 0

    def has(self, resource: str) -> bool:
        """Whether some node has, or some node type the autoscaler may start would have, `resource`."""
        return any(node.get(resource, 0) > 0 for node in self.nodes) or any(
            res.get(resource, 0) > 0 for _, res, count in self.node_types if count > 0 and self.max_added != 0
        )

    def bundles_that_fit(self, bundle: dict[str, float]) -> int:
        """How many copies of `bundle` (one worker's resources) the cluster holds at most, counting
        the nodes its autoscaler may add, so a PACK or SPREAD placement of that many can succeed."""

        def per_node(resources: dict[str, float]) -> int:
            needed = [(k, v) for k, v in bundle.items() if v > 0]
            if not needed:
                return 1 << 30
            return min(int(resources.get(k, 0) / v + 1e-9) for k, v in needed)

        total = sum(per_node(node) for node in self.nodes)
        room = float("inf") if self.max_added is None else self.max_added
        for _, resources, count in sorted(self.node_types, key=lambda t: per_node(t[1]), reverse=True):
            added = int(min(count, room))
            total += per_node(resources) * added
            room -= added
        return total

    def describe(self) -> str:
        def fmt(resources: dict[str, float]) -> str:
            shown = {
                k: v
                for k, v in resources.items()
                if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))
            }
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"

        text = f"{len(self.nodes)} node(s) {', '.join(fmt(n) for n in self.nodes) or ''}".rstrip()
        types = [f"up to {count} x {name} {fmt(res)}" for name, res, count in self.node_types if count > 0]
        if types and self.max_added != 0:
            limit = "" if self.max_added is None else f", at most {self.max_added} in all"
            return f"{text}; its autoscaler can add {', '.join(types)}{limit}"
        return f"{text} and no autoscaler that can add more"


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's nodes, plus the node types its autoscaler reported to the GCS."""
    driver_node = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    capacity = ClusterCapacity(
        nodes=[{k: float(v) for k, v in node.get("Resources", {}).items()} for node in alive],
        other_nodes=sum(node.get("NodeID") != driver_node for node in alive),
    )
    capacity.node_types, capacity.max_added = _autoscaler_node_types()
    return capacity


def _autoscaler_node_types() -> tuple[list[tuple[str, dict[str, float], int]], int | None]:
    """(node types, limit on added nodes) of the cluster's autoscaler; ([], None) without one."""
    from ray._private.state import state

    config = state.get_cluster_config()  # reported to the GCS by autoscalers that do (KubeRay's v2)
    if config is not None and config.node_group_configs:
        unlimited = 1 << 30
        return [
            (
                group.name,
                {k: float(v) for k, v in group.resources.items()},
                unlimited if group.max_count < 0 else int(group.max_count),
            )
            for group in config.node_group_configs
        ], None
    # The VM launcher (`ray up`) reports nothing; it leaves its config where Tune also looks for it
    # (ray.tune.execution.cluster_info): on the head, where `ray job submit` runs the driver.
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        import yaml

        return launcher_node_types(yaml.safe_load(path.read_text()) or {})
    return [], None


def launcher_node_types(config: dict) -> tuple[list[tuple[str, dict[str, float], int]], int | None]:
    """(worker node types, global max_workers) of a cluster launcher config such as cluster.yaml."""
    head = config.get("head_node_type")
    types = [
        (name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, int(spec.get("max_workers", 0)))
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    ]
    limit = config.get("max_workers")
    return types, None if limit is None else int(limit)


def resolve_resources(cfg: Config, capacity: ClusterCapacity | None = None) -> Config:
    """Fill in train.use_gpu="auto" and cpus_per_worker=0 from the Ray cluster, and refuse a
    placement the cluster can never satisfy (Ray Train would otherwise wait and retry for ever)."""
    cfg = from_dict(to_dict(cfg))
    capacity = capacity or cluster_capacity()
    if cfg.train.use_gpu == "auto":
        # On an autoscaling cluster the GPU nodes may not exist yet when the job starts: the node
        # types decide, or "auto" would quietly train on the GPU nodes' CPUs.
        cfg.train.use_gpu = capacity.has("GPU")
    if not cfg.train.cpus_per_worker:
        cpus = sum(node.get("CPU", 0) for node in capacity.nodes)
        cfg.train.cpus_per_worker = float(max(1, int(cpus // cfg.train.workers)))
    bundle = worker_resources(cfg)
    fits = capacity.bundles_that_fit(bundle)
    if fits < cfg.train.workers:
        asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
        raise ConfigError(
            f"The run asks for {cfg.train.workers} Ray Train worker(s) with {asked} each, but the cluster "
            f"({capacity.describe()}) can hold {fits}; lower train.workers or train.cpus_per_worker"
            f"{', set train.use_gpu=false' if cfg.train.use_gpu else ''}, or add nodes (cluster.yaml max_workers)."
        )
    return cfg


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker holds (resources must be resolved: see resolve_resources)."""
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return {**resources, **cfg.train.resources_per_worker}


def check_storage_reach(cfg: Config, dataset_uri: str, capacity: ClusterCapacity) -> None:
    """Refuse local folders for the data and the run when workers may run on another machine.

    A folder on the driver's disk does not exist on the other nodes: their workers would fail
    with a misleading "dataset missing" (retried train.max_failures times) or, for run.storage,
    only at the first checkpoint, an epoch later.
    """
    if not (capacity.other_nodes or capacity.can_add_nodes()):
        return
    where = f"this Ray cluster has (or can add) nodes other than the driver's ({capacity.describe()}), whose workers cannot see it"
    if not storage.is_s3(dataset_uri):
        raise ConfigError(
            f"The dataset {dataset_uri or cfg.data.source} is a local folder, but {where}; prepare it into S3 "
            f"(python jobs/prepare_data.py --dest s3://BUCKET/PREFIX) and set data.uri to the s3:// version it prints."
        )
    if not storage.is_s3(cfg.run.storage):
        raise ConfigError(
            f"run.storage {cfg.run.storage} is a local folder, but {where}; set run.storage=s3://BUCKET/PREFIX."
        )


def absolute_dataset_uri(uri: str) -> str:
    """An s3:// URI as it is; a local folder as an absolute path (workers do not share our cwd)."""
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def init_ray(address: str | None = None, num_cpus: int | None = None, **options) -> None:
    """Join the cluster at `address` (default: RAY_ADDRESS, set by `ray job submit`), or start a
    local one on 127.0.0.1 (`num_cpus` applies to a local one only; `options` go to ray.init).

    A RAY_ADDRESS whose GCS does not answer is refused at once: `ray.init` would wait on it for
    minutes. When ASHA stops a trial, Ray Train's placement-group cleaner frees the trial's workers;
    it finds the cluster through the dashboard and, if it has to guess while other Ray instances
    run on the same machine, gives up, so the stopped trial's CPUs are never freed and the next
    trial waits for ever. A local cluster therefore gets a known dashboard port whose address every
    Ray process inherits (the raylet copies this process's environment).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
        ray.init(address=address, **options)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        **options,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One sentence instead of ray.init's minutes-long wait when RAY_ADDRESS names a dead GCS."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: Ray's own lookup
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"No Ray cluster answers at RAY_ADDRESS={address} ({exc.strerror or exc}); start it "
            f"(ray start --head) or unset RAY_ADDRESS to run on a local Ray instance."
        ) from None


def prepare_run(cfg: Config, dataset_uri: str | None = None) -> Config:
    """The driver's checks, each once, before data is prepared and anything travels to a worker.

    First what is refused in seconds without Ray: the run's storage (reachable, bucket exists,
    writable: said now, not by Ray's controller an epoch later) and a raw data source that cannot
    exist. Then, joined to the Ray cluster (or a local one started): paths made absolute, local
    folders refused on a multi-node cluster, resources resolved and the placement shown possible.
    `dataset_uri` defaults to data.uri (empty: prepared from data.source into the local cache).
    """
    from simpsons import tracking
    from simpsons.cli import check_inputs

    cfg = tracking.resolve(cfg)  # MLFLOW_TRACKING_URI and the experiment's default, settled on the driver
    check_inputs(cfg, dataset_uri)
    init_ray()
    cfg = resolve_paths(cfg)
    capacity = cluster_capacity()
    check_storage_reach(cfg, cfg.data.uri if dataset_uri is None else dataset_uri, capacity)
    return resolve_resources(cfg, capacity)
