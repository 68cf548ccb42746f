"""The Ray cluster a job runs on: joining or starting it, what it can hold, and the driver's checks.

`init_ray` is the one way every job, sweep, benchmark and test fixture reaches Ray. `prepare_run`
is what the driver checks before anything travels to a worker: paths made absolute, local folders
refused on a multi-node cluster, resources resolved against the nodes (live ones and the ones the
autoscaler may add) and a placement that can never happen refused in one sentence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

from simpsons import kuberay, ray_internals, storage
from simpsons.config import NOT_PATHS, Config, ConfigError, from_dict, is_relative_path, to_dict
from simpsons.errors import UserError

_logger = logging.getLogger(__name__)

# Where the cluster launcher (`ray up`) puts its config on the head node.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


# Resources that say what a node is for; memory and the object store vary with the machine and
# the node's settings, so they neither identify a node type nor limit a worker here.
def _placement_keys(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store"))}


@dataclass
class NodeType:
    """A kind of node the autoscaler may start: its name, one node's resources, how many more."""

    name: str
    resources: dict[str, float]
    addable: int  # nodes of this type the autoscaler may still add (its max minus the live ones)


@dataclass
class ClusterCapacity:
    """The Ray cluster's live nodes and what its autoscaler may still add."""

    # Total resources of every live node, e.g. {"CPU": 48.0, "GPU": 4.0}; busy ones included,
    # since they are freed again: only what can never exist makes a run impossible.
    nodes: list[dict[str, float]]
    # Live nodes other than the driver's (Ray Train workers may land on any of them).
    other_nodes: int
    node_types: list[NodeType] = field(default_factory=list)
    # The autoscaler's limit on worker nodes it may still add, all types together (None: none).
    max_added: int | None = None
    # Non-empty when an autoscaler runs whose node types could not be read: why not. Placement is
    # then the autoscaler's to judge, within train.capacity_timeout_s.
    unknown_types: str = ""

    def can_add_nodes(self) -> bool:
        return bool(self.unknown_types) or (any(t.addable > 0 for t in self.node_types) and self.max_added != 0)

    def has(self, resource: str) -> bool:
        """Whether some node has, or some node type the autoscaler may start would have, `resource`."""
        return any(node.get(resource, 0) > 0 for node in self.nodes) or any(
            t.resources.get(resource, 0) > 0 for t in self.node_types if t.addable > 0 and self.max_added != 0
        )

    def bundles_that_fit(self, bundle: dict[str, float]) -> int:
        """How many copies of `bundle` (one worker's resources) the cluster holds at most, counting
        the nodes its autoscaler may still add, so a PACK or SPREAD placement of that many can succeed."""
        total = sum(_per_node(bundle, node) for node in self.nodes)
        room = float("inf") if self.max_added is None else self.max_added
        for node_type in sorted(self.node_types, key=lambda t: _per_node(bundle, t.resources), reverse=True):
            added = int(min(node_type.addable, room))
            total += _per_node(bundle, node_type.resources) * added
            room -= added
        return total

    def types_that_hold(self, bundle: dict[str, float]) -> list[str]:
        """Names of the node types one node of which holds at least one `bundle`."""
        return [t.name for t in self.node_types if _per_node(bundle, t.resources) > 0]

    def describe(self) -> str:
        def fmt(resources: dict[str, float]) -> str:
            shown = _placement_keys(resources)
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"

        text = f"{len(self.nodes)} node(s) {', '.join(fmt(n) for n in self.nodes) or ''}".rstrip()
        if self.unknown_types:
            return f"{text}; its autoscaler's node types are unknown"
        types = [f"up to {t.addable} x {t.name} {fmt(t.resources)}" for t in self.node_types if t.addable > 0]
        if types and self.max_added != 0:
            limit = "" if self.max_added is None else f", at most {self.max_added} in all"
            return f"{text}; its autoscaler can add {', '.join(types)}{limit}"
        return f"{text} and no autoscaler that can add more"


def _per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """Copies of `bundle` one node with `resources` holds."""
    needed = [(k, v) for k, v in bundle.items() if v > 0]
    if not needed:
        return 1 << 30
    return min(int(resources.get(k, 0) / v + 1e-9) for k, v in needed)


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's live nodes, plus the node types its autoscaler may still add."""
    driver_node = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    nodes = [{k: float(v) for k, v in node.get("Resources", {}).items()} for node in alive]
    capacity = ClusterCapacity(nodes=nodes, other_nodes=sum(node.get("NodeID") != driver_node for node in alive))
    types, limit, unknown = autoscaler_node_types()
    if unknown and autoscaler_state() is not None:
        capacity.unknown_types = unknown
    workers = [node for node in nodes if "node:__internal_head__" not in node]
    capacity.node_types, capacity.max_added = addable_node_types(types, limit, workers)
    return capacity


def addable_node_types(
    types: list[NodeType], limit: int | None, live_workers: list[dict[str, float]]
) -> tuple[list[NodeType], int | None]:
    """The node types with what the autoscaler may still add of each, and its global limit less
    the live worker nodes: a live node counts once, as itself, never again as a node to add.
    A live node is of the first type whose CPUs, GPUs and custom resources it has exactly."""
    addable = {t.name: t.addable for t in types}
    for node in live_workers:
        kind = next((t for t in types if _placement_keys(t.resources).items() <= node.items()), None)
        if kind is not None:
            addable[kind.name] = max(0, addable[kind.name] - 1)
    room = None if limit is None else max(0, limit - len(live_workers))
    return [NodeType(t.name, t.resources, addable[t.name]) for t in types], room


def autoscaler_node_types() -> tuple[list[NodeType], int | None, str]:
    """(node types, limit on worker nodes, "") of the cluster's autoscaler, from where its launcher
    keeps them: on KubeRay the RayCluster object, after `ray up` the head's bootstrap config.
    ([], None, why) when they cannot be read (or there are none: a plain `ray start`/`ray.init`)."""
    where = kuberay.cluster_name()
    if where:
        try:
            config = kuberay.autoscaling_config(kuberay.read_ray_cluster(*where))
        except kuberay.KubeRayError as exc:
            return [], None, f"reading RayCluster {where[0]} failed: {exc}"
        return launcher_node_types(config) + ("",) if config else ([], 0, "")
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        return launcher_node_types(yaml.safe_load(path.read_text()) or {}) + ("",)
    return [], None, f"neither a KubeRay RayCluster nor {LAUNCHER_CONFIG} names them"


def launcher_node_types(config: dict) -> tuple[list[NodeType], int | None]:
    """(worker node types, global max_workers) of a cluster launcher config such as cluster.yaml."""
    head = config.get("head_node_type")
    types = [
        NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, int(spec.get("max_workers", 0)))
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    ]
    limit = config.get("max_workers")
    return types, None if limit is None else int(limit)


def autoscaler_state() -> dict[str, dict[str, int]] | None:
    """What the cluster's autoscaler says of its launches, {"pending": {type: n}, "failed": {type: n}},
    or None when no autoscaler reports (a plain `ray start --head` or `ray.init()`)."""
    report = ray_internals.v1_autoscaler_report()
    if report:
        failed: dict[str, int] = {}
        for _, node_type in report.get("failed_nodes") or []:
            failed[node_type] = failed.get(node_type, 0) + 1
        return {"pending": dict(report.get("pending_launches") or {}), "failed": failed}
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if not is_autoscaler_v2(fetch_from_server=True):
        return None
    from ray.autoscaler.v2.sdk import get_cluster_status  # autoscaler v2 (`ray up` since Ray 2.50)

    status = get_cluster_status(ray.get_runtime_context().gcs_address)

    def by_type(launches) -> dict[str, int]:
        counts: dict[str, int] = {}
        for launch in launches:
            counts[launch.ray_node_type_name] = counts.get(launch.ray_node_type_name, 0) + launch.count
        return counts

    return {"pending": by_type(status.pending_launches), "failed": by_type(status.failed_launches)}


def resolve_resources(
    cfg: Config, capacity: ClusterCapacity | None = None, runs_at_once: int = 1, driver_cpus: float = 0.0
) -> Config:
    """Fill in train.use_gpu="auto" and cpus_per_worker=0 from the Ray cluster, and refuse a
    placement the cluster can never satisfy (Ray Train would otherwise wait for capacity).

    cpus_per_worker=0 shares the cluster's CPUs evenly between the workers of the `runs_at_once`
    runs that train at once (a sweep's concurrent trials), less `driver_cpus` for each run's driver."""
    cfg = from_dict(to_dict(cfg))
    capacity = capacity or cluster_capacity()
    if cfg.train.use_gpu == "auto":
        # On an autoscaling cluster the GPU nodes may not exist yet when the job starts: the node
        # types decide, or "auto" would quietly train on the GPU nodes' CPUs.
        cfg.train.use_gpu = capacity.has("GPU")
    if not cfg.train.cpus_per_worker:
        cpus = sum(node.get("CPU", 0) for node in capacity.nodes) - runs_at_once * driver_cpus
        cfg.train.cpus_per_worker = float(max(1, int(cpus // (cfg.train.workers * runs_at_once))))
    bundle = worker_resources(cfg)
    asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    if capacity.unknown_types:
        _logger.warning(
            "Not checked whether the cluster can hold %d worker(s) with %s each: its autoscaler runs, but %s; "
            "the autoscaler decides, and the run waits at most train.capacity_timeout_s=%g s for their nodes%s.",
            cfg.train.workers,
            asked,
            capacity.unknown_types,
            cfg.train.capacity_timeout_s,
            "" if cfg.train.use_gpu else " (train.use_gpu=auto means CPU here: no live node has a GPU)",
        )
        return cfg
    fits = capacity.bundles_that_fit(bundle)
    if fits < cfg.train.workers:
        raise ConfigError(
            f"The run asks for {cfg.train.workers} Ray Train worker(s) with {asked} each, but the cluster "
            f"({capacity.describe()}) can hold {fits}; lower train.workers or train.cpus_per_worker"
            f"{', set train.use_gpu=false' if cfg.train.use_gpu else ''}, or add nodes (cluster.yaml max_workers)."
        )
    return cfg


class CapacityError(UserError):
    """The nodes a run's workers need did not come within train.capacity_timeout_s."""


# Restarts of the Train controller after a failure of its own (a worker group that did not start
# in time) before the run fails. Ray's default, -1, retries for ever: a run that can never start
# would never end. Each start attempt gets an equal share of train.capacity_timeout_s.
CONTROLLER_FAILURE_LIMIT = 3
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller


def bound_capacity_wait(cfg: Config) -> None:
    """Make Ray Train give up on a worker group that does not start within train.capacity_timeout_s
    in all (the controller inherits RAY_TRAIN_* variables from the process that calls fit)."""
    os.environ[START_TIMEOUT_VARIABLE] = f"{cfg.train.capacity_timeout_s / (CONTROLLER_FAILURE_LIMIT + 1):g}"


class LaunchWatch:
    """What the autoscaler last said of its launches while a run waited: read every few seconds
    in the background, so that the capacity sentence can name the launches after the run gave up
    (by then its placement group is gone, and with it the autoscaler's pending launches)."""

    def __init__(self, cfg: Config):
        self.seen: dict[str, dict[str, int]] | None = None
        # Often enough to see a launch within one start attempt; one small GCS read each time.
        self._interval_s = max(1.0, min(10.0, cfg.train.capacity_timeout_s / 20))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launch-watch", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                state = autoscaler_state()
            except Exception as exc:  # a status read is a nicety: never disturb the run over it
                _logger.debug("Could not read the autoscaler's state: %s", exc)
                continue
            if state and (state["pending"] or state["failed"]):
                self.seen = state

    def __enter__(self) -> LaunchWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)


def capacity_error(cfg: Config, failure: BaseException, seen: dict | None = None) -> BaseException:
    """`failure` of a Train run as the user should read it: a worker group that never started is a
    CapacityError naming what was asked for and what the autoscaler did (`seen`: its launches as a
    LaunchWatch saw them during the wait); anything else as it is."""
    if not ray_internals.is_worker_group_start_timeout(getattr(failure, "controller_failure", None)):
        return failure
    bundle = worker_resources(cfg)
    asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    try:
        capacity, state = cluster_capacity(), seen or autoscaler_state()
    except Exception as exc:  # the cluster itself may be what failed: the sentence still stands
        capacity, state = None, None
        _logger.debug("Could not read the cluster's state: %s", exc)
    types = ", ".join(capacity.types_that_hold(bundle)) if capacity and capacity.node_types else ""
    launches = "; the autoscaler reports no launch"
    if state and (state["pending"] or state["failed"]):
        parts = [f"{n} launch(es) of {t} not joined yet" for t, n in state["pending"].items()]
        parts += [f"{n} failed node(s) of {t}" for t, n in state["failed"].items()]
        launches = f"; the autoscaler reports {', '.join(parts)}"
    where = f"node type {types}" if types else "the GPU node types"
    return CapacityError(
        f"No capacity came for the run: it waited {cfg.train.capacity_timeout_s:g} s for {cfg.train.workers} "
        f"Ray Train worker(s) with {asked} each and the cluster "
        f"({capacity.describe() if capacity else 'unreachable'}) did not get the nodes{launches}; check the "
        f"cloud account's quota and the zone's capacity for {where} (or the pods' events on Kubernetes), "
        f"or raise train.capacity_timeout_s."
    )


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
    if cfg.model.weights and cfg.model.weights not in NOT_PATHS and not storage.is_s3(cfg.model.weights):
        raise ConfigError(
            f"model.weights {cfg.model.weights} is a local file, but {where}; upload it "
            f"(aws s3 cp) and set model.weights=s3://BUCKET/KEY."
        )


# Where `ray job submit --working-dir` unpacks the job's files on the node that runs its driver.
_RAY_PACKAGE_DIR = "/runtime_resources/working_dir_files/"


def check_output_paths(cfg: Config, cwd: str | Path | None = None) -> None:
    """Refuse a relative run.storage in a job that runs from the copy of its working dir that Ray
    unpacked (`ray job submit --working-dir`): checkpoints would land in Ray's package cache, which
    Ray deletes, and not where the user typed the path."""
    cwd = str(Path(cwd or Path.cwd()))
    if _RAY_PACKAGE_DIR in cwd + "/" and not storage.is_s3(cfg.run.storage) and is_relative_path(cfg.run.storage):
        raise ConfigError(
            f"run.storage {cfg.run.storage} is relative, but this job runs in the copy of its working dir that "
            f"Ray unpacked ({cwd}) and deletes later; set run.storage to an absolute folder or s3://BUCKET/PREFIX."
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


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on now. They are held together
    while picked: one by one, the kernel may hand out a port it has just handed out and seen closed."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    return free_ports(1)[0]


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
