"""The driver's checks before a run travels, without starting Ray: paths, placement, local folders.

The cluster is described as the driver sees it (live nodes plus the autoscaler's node types);
the node types come from the repo's own cluster.yaml, read the way the driver reads the
launcher's copy of it on the head (~/ray_bootstrap_config.yaml).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from simpsons.cluster import (
    ClusterCapacity,
    NodeType,
    addable_node_types,
    check_output_paths,
    check_storage_reach,
    launcher_node_types,
    resolve_resources,
)
from simpsons.config import ConfigError, load_config, resolve_paths

REPO = Path(__file__).resolve().parents[2]


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
    assert NodeType("gpu_4x_a10g", {"CPU": 48.0, "GPU": 4.0}, 4) in types
    assert all(t.name != "head" for t in types)


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


def test_live_worker_nodes_are_not_counted_again_as_nodes_to_add():
    """Two of cluster.yaml's 4 GPU nodes are up: the autoscaler may add 2 more, not 4 on top."""
    types, limit = launcher_node_types(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    live = [{"CPU": 48.0, "GPU": 4.0, "memory": 1e11, "node:10.0.0.7": 1.0}] * 2
    addable, room = addable_node_types(types, limit, live)
    assert NodeType("gpu_4x_a10g", {"CPU": 48.0, "GPU": 4.0}, 2) in addable and room == 2
    capacity = ClusterCapacity(
        nodes=[{"CPU": 0.0, "trial_driver": 16.0}, *live], other_nodes=2, node_types=addable, max_added=room
    )
    assert capacity.bundles_that_fit({"CPU": 8.0, "GPU": 1.0}) == 16  # 2 live + 2 more, 4 workers each
    with pytest.raises(ConfigError, match="can hold 16"):
        resolve_resources(load_config(REPO / "configs" / "cluster.yaml", ["train.workers=17"]), capacity)


def test_an_autoscaler_whose_node_types_are_unknown_decides_itself():
    """Never refused for what the driver could not learn: the autoscaler's verdict and the bounded
    wait (train.capacity_timeout_s) decide; local folders stay refused (nodes may come)."""
    capacity = ClusterCapacity(nodes=[{"CPU": 0.0}], other_nodes=0, unknown_types="no RayCluster could be read")
    cfg = resolve_resources(load_config(None, ["train.workers=8", "train.resources_per_worker={A10G: 1}"]), capacity)
    assert cfg.train.workers == 8 and cfg.train.use_gpu is False
    assert capacity.can_add_nodes() and "node types are unknown" in capacity.describe()
    with pytest.raises(ConfigError, match="is a local folder"):
        check_storage_reach(cfg, "/data/packed", capacity)


def test_a_local_weights_file_is_refused_when_other_nodes_would_load_it(tmp_path):
    cfg = load_config(None, ["run.storage=s3://bucket/runs", "model.arch=resnet18", f"model.weights={tmp_path}/r18.pt"])
    with pytest.raises(ConfigError, match=rf"model.weights {tmp_path}/r18.pt is a local file, but this Ray cluster"):
        check_storage_reach(cfg, "s3://bucket/data/v1", launched_cluster())
    for kept in ("none", "imagenet", "s3://bucket/weights/r18.pt"):
        check_storage_reach(
            load_config(None, ["run.storage=s3://b/r", f"model.weights={kept}"]), "s3://b/d", launched_cluster()
        )
    check_storage_reach(cfg, str(tmp_path), laptop())  # one machine: the file is where the worker runs


def test_a_relative_run_storage_is_refused_in_rays_unpacked_working_dir(tmp_path):
    """`ray job submit --working-dir .` runs the driver in Ray's copy of the folder, which Ray deletes."""
    unpacked = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["run.storage=./runs-wd"])
    with pytest.raises(ConfigError, match=r"run.storage ./runs-wd is relative, but this job runs in the copy"):
        check_output_paths(cfg, cwd=unpacked)
    check_output_paths(cfg, cwd=tmp_path)  # a plain run: resolved where the user typed it
    for kept in ("s3://bucket/runs", str(tmp_path / "runs")):
        check_output_paths(load_config(None, [f"run.storage={kept}"]), cwd=unpacked)


def test_the_code_version_comes_from_the_environment_where_there_is_no_git(monkeypatch, tmp_path):
    from simpsons.checkpoint import COMMIT_VARIABLE, code_version

    monkeypatch.setenv("PATH", str(tmp_path))  # no git: as in the image or Ray's unpacked working dir
    monkeypatch.delenv(COMMIT_VARIABLE, raising=False)
    assert "+git." not in code_version()
    monkeypatch.setenv(COMMIT_VARIABLE, "0123456789ab")
    assert code_version().endswith("+git.0123456789ab")


def earlier_run(run: Path, manifest_sha256: str, classes: list[str]) -> None:
    """What Ray Train leaves of a run that reported a checkpoint: its folder with metrics.json."""
    folder = run / "checkpoint_2026-12-01_10-00-00.000000"
    folder.mkdir(parents=True)
    metrics = {
        "provenance": {"dataset_uri": "s3://old/data/v1", "manifest_sha256": manifest_sha256},
        "val": {"per_class": [{"class": name} for name in classes]},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_resuming_a_run_on_other_data_is_refused_and_resume_false_starts_over(tmp_path, packed_dataset):
    from simpsons.checkpoint import check_resume
    from simpsons.dataset import manifest_sha256, read_manifest

    ours, classes = manifest_sha256(packed_dataset), read_manifest(packed_dataset)["class_names"]
    run = tmp_path / "runs" / "smoke"
    check_resume(str(run), str(packed_dataset), resume=True)  # nothing there yet
    earlier_run(run, ours, classes)
    check_resume(str(run), str(packed_dataset), resume=True)  # the same data: it resumes
    earlier_run(tmp_path / "other", "f" * 64, classes[:2])
    with pytest.raises(ConfigError) as err:
        check_resume(str(tmp_path / "other"), str(packed_dataset), resume=True)
    message = str(err.value)
    assert "trained on s3://old/data/v1 (manifest sha256 ffffffffffff, 2 classes)" in message
    assert f"this run trains on {packed_dataset} (manifest sha256 {ours[:12]}, {len(classes)} classes)" in message
    assert message.endswith("or choose another run.name.") and message.count(". ") == 0
    check_resume(str(tmp_path / "other"), str(packed_dataset), resume=False)
    (aside,) = tmp_path.glob("other.replaced-*")
    assert (aside / "checkpoint_2026-12-01_10-00-00.000000" / "metrics.json").is_file()
    assert not (tmp_path / "other").exists()


def test_resume_false_moves_an_s3_run_aside_without_losing_an_object(bucket, packed_dataset, tmp_path):
    import boto3

    from simpsons import storage
    from simpsons.checkpoint import check_resume

    earlier_run(tmp_path / "run", "f" * 64, ["a", "b"])
    (tmp_path / "run" / "config.yaml").write_text("run: {}\n")
    storage.upload_dir(tmp_path / "run", f"s3://{bucket}/runs/smoke")
    check_resume(f"s3://{bucket}/runs/smoke", str(packed_dataset), resume=False)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 2 and all(k.startswith("runs/smoke.replaced-") for k in keys), keys


def test_a_dataset_packed_at_another_side_than_data_stored_size_is_refused_before_ray(bucket, packed_dataset, tmp_path):
    # Training would crop from the dataset's images while evaluation, serving and model.pt2 decode
    # at data.stored_size: configs/finetune.yaml (256 px) on a dataset packed at the default 144, say.
    from simpsons import storage
    from simpsons.driver import check_inputs

    storage.upload_dir(packed_dataset, f"s3://{bucket}/datasets/v1")
    runs = f"run.storage={tmp_path / 'runs'}"
    for uri in (str(packed_dataset), f"s3://{bucket}/datasets/v1"):
        check_inputs(load_config(None, [f"data.uri={uri}", "data.stored_size=40", "data.train_size=32", runs]))
        with pytest.raises(ConfigError) as caught:
            check_inputs(load_config(REPO / "configs" / "finetune.yaml", [f"data.uri={uri}", runs]))
        message = str(caught.value)
        assert f"{uri} was packed at 40 px but data.stored_size is 256; set data.stored_size=40" in message
        assert "jobs/prepare_data.py --set data.stored_size=256 --version <new>" in message
        assert len(message.splitlines()) == 1
