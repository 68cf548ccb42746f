"""The driver's checks before a run travels, without starting Ray: paths, placement, local folders.

The cluster is described as the driver sees it (live nodes plus the autoscaler's node types);
the node types come from the repo's own cluster.yaml, read the way the driver reads the
launcher's copy of it on the head (~/ray_bootstrap_config.yaml).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from simpsons.cluster import ClusterCapacity, check_storage_reach, launcher_node_types, resolve_resources
from simpsons.config import ConfigError, load_config, resolve_paths

REPO = Path(__file__).resolve().parents[1]


def launched_cluster(**overrides) -> ClusterCapacity:
    """cluster.yaml right after `ray up`: the head alone (no CPUs or GPUs for the scheduler)."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config.update(overrides)
    node_types, limit = launcher_node_types(config)
    return ClusterCapacity(
        nodes=[{"CPU": 0.0, "GPU": 0.0, "trial_driver": 16.0}], other_nodes=0, node_types=node_types, max_added=limit
    )


def laptop(cpus: float = 2.0) -> ClusterCapacity:
    """A plain `ray.init()`: one node, no autoscaler."""
    return ClusterCapacity(nodes=[{"CPU": cpus}], other_nodes=0)


def test_relative_paths_become_absolute_and_uris_stay(tmp_path):
    cfg = load_config(REPO / "configs" / "local.yaml", ["data.uri=packed/v1", "data.source=../images"])
    resolved = resolve_paths(cfg, cwd=tmp_path)
    assert resolved.run.storage == str(tmp_path / "runs")
    assert resolved.data.cache_dir == str(tmp_path / "cache")
    assert resolved.data.uri == str(tmp_path / "packed" / "v1")
    assert resolved.data.source == str(tmp_path.parent / "images")
    kept = load_config(
        None,
        [
            "run.storage=s3://bucket/runs",
            "data.uri=s3://bucket/data/v1",
            "data.source=https://example.com/d.tar.xz",
            "data.cache_dir=~/.cache/simpsons",
        ],
    )
    # s3:// and http(s) are URIs; `~` means the home of whichever node reads it (a node-local cache).
    assert resolve_paths(kept, cwd=tmp_path) == kept
    assert resolve_paths(resolved, cwd="/elsewhere") == resolved  # resolving twice changes nothing


def test_a_relative_weights_file_is_resolved_on_the_driver_and_the_keywords_stay(tmp_path):
    given = resolve_paths(load_config(None, ["model.arch=resnet18", "model.weights=weights/r18.pt"]), cwd=tmp_path)
    assert given.model.weights == str(tmp_path / "weights" / "r18.pt")
    for keyword in ("none", "imagenet"):
        cfg = load_config(None, ["model.arch=resnet18", f"model.weights={keyword}"])
        assert resolve_paths(cfg, cwd=tmp_path).model.weights == keyword


def test_launcher_config_gives_worker_types_and_the_global_limit():
    types, limit = launcher_node_types(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    assert limit == 4
    assert ("gpu_4x_a10g", {"CPU": 48.0, "GPU": 4.0}, 4) in types
    assert all(name != "head" for name, _, _ in types)


def test_auto_gpu_means_gpu_on_a_cluster_whose_node_types_have_gpus():
    # No GPU node exists when the job starts; the autoscaler starts them when the job asks.
    cfg = resolve_resources(load_config(None, ["train.use_gpu=auto"]), launched_cluster())
    assert cfg.train.use_gpu is True
    assert resolve_resources(load_config(None, ["train.use_gpu=auto"]), laptop()).train.use_gpu is False


def test_configs_cluster_yaml_fits_the_cluster_and_one_worker_more_than_it_can_add_does_not():
    cfg = load_config(REPO / "configs" / "cluster.yaml")
    assert resolve_resources(cfg, launched_cluster()).train.workers == 8
    # 4 x g5.12xlarge hold 16 GPU workers with 8 CPUs each; the 8-GPU type is off (max_workers 0).
    with pytest.raises(ConfigError) as err:
        resolve_resources(load_config(REPO / "configs" / "cluster.yaml", ["train.workers=17"]), launched_cluster())
    message = str(err.value)
    assert message.startswith(
        "The run asks for 17 Ray Train worker(s) with 8 CPU, 1 GPU each, but the cluster (1 node(s)"
    )
    assert "its autoscaler can add up to 4 x gpu_4x_a10g {CPU: 48, GPU: 4}, at most 4 in all) can hold 16" in message
    assert message.endswith("or add nodes (cluster.yaml max_workers).") and message.count(". ") == 0


def test_the_global_max_workers_caps_what_the_autoscaler_can_add():
    capacity = launched_cluster(max_workers=1)
    assert capacity.bundles_that_fit({"CPU": 8.0, "GPU": 1.0}) == 4
    with pytest.raises(ConfigError, match="can hold 4"):
        resolve_resources(load_config(REPO / "configs" / "cluster.yaml", ["train.workers=5"]), capacity)


@pytest.mark.parametrize(
    "overrides, asked",
    [
        (["train.use_gpu=true"], "1 Ray Train worker(s) with 2 CPU, 1 GPU each"),
        (["train.workers=3", "train.cpus_per_worker=1"], "3 Ray Train worker(s) with 1 CPU each"),
    ],
)
def test_a_laptop_refuses_gpus_and_more_workers_than_cpus(overrides, asked):
    with pytest.raises(ConfigError, match=re.escape(asked)) as err:
        resolve_resources(load_config(None, overrides), laptop(cpus=2.0))
    assert "1 node(s) {CPU: 2} and no autoscaler that can add more" in str(err.value)


def test_local_folders_are_refused_when_the_autoscaler_can_add_nodes(tmp_path):
    cfg = load_config(None, [f"run.storage={tmp_path}/runs"])
    with pytest.raises(
        ConfigError,
        match=rf"The dataset {tmp_path}/packed is a local folder, but this Ray cluster "
        r"has \(or can add\) nodes other than the driver's",
    ):
        check_storage_reach(cfg, str(tmp_path / "packed"), launched_cluster())
    with pytest.raises(ConfigError, match=rf"run.storage {tmp_path}/runs is a local folder.*set run.storage=s3://"):
        check_storage_reach(cfg, "s3://bucket/data/v1", launched_cluster())
    # One machine, no autoscaler: local folders are what a laptop run uses.
    check_storage_reach(cfg, str(tmp_path / "packed"), laptop())


@pytest.mark.slow
def test_ray_train_gives_up_on_a_worker_group_that_never_starts(ray_cluster, packed_dataset, monkeypatch):
    """Past the driver's check (skipped here on purpose), a worker group that cannot start is
    retried simpsons.train.CONTROLLER_FAILURE_LIMIT times, not for ever (Ray's default): without
    the limit this test would hang until pytest's timeout."""
    import ray.train

    from simpsons.train import build_trainer

    # The controller inherits RAY_TRAIN_* from the driver: give up on each start after 2 s.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")
    cfg = load_config(
        None,
        [
            "train.workers=9",
            "train.cpus_per_worker=1",
            "train.use_gpu=false",
            "data.stored_size=40",
            "data.train_size=32",
            "optim.epochs=1",
            f"run.storage={packed_dataset.parent / 'never-started'}",
        ],
    )
    with pytest.raises(ray.train.ControllerError) as err:  # 9 workers x 1 CPU on a 4-CPU cluster
        build_trainer(cfg, str(packed_dataset)).fit()
    assert "worker group startup timed out after 2.0 seconds waiting for 9 workers" in str(err.value), err.value


@pytest.mark.slow
def test_the_driver_finds_the_autoscalers_node_types_where_ray_keeps_them(ray_cluster, tmp_path, monkeypatch):
    """`ray up` leaves its config in the head's ~/ray_bootstrap_config.yaml; an autoscaler that
    reports its node groups to the GCS (autoscaler_pb2.ClusterConfig) is read from there first."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from simpsons.cluster import cluster_capacity

    monkeypatch.setenv("HOME", str(tmp_path))  # the driver's home on the head
    plain = cluster_capacity()  # a plain `ray.init()`: no autoscaler
    assert (plain.node_types, plain.max_added, plain.other_nodes) == ([], None, 0) and not plain.can_add_nodes()
    (tmp_path / "ray_bootstrap_config.yaml").write_text((REPO / "cluster.yaml").read_text())
    capacity = cluster_capacity()
    assert ("gpu_4x_a10g", {"CPU": 48.0, "GPU": 4.0}, 4) in capacity.node_types and capacity.max_added == 4
    assert capacity.can_add_nodes() and capacity.has("GPU")

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "gpu-group", 2
    group.resources.update({"CPU": 8, "GPU": 1})
    namespace, key = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE, ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert cluster_capacity().node_types == [("gpu-group", {"CPU": 8.0, "GPU": 1.0}, 2)]
    finally:
        _internal_kv_del(key, namespace=namespace)
