"""Scale from zero with Ray's own autoscaler: jobs submitted to a cluster that has no worker node.

Each cluster is a real `ray start --head --autoscaling-config` on 127.0.0.1 (tests/ray_head.py)
whose autoscaler uses Ray's fake multi-node provider (tests/autoscaling.py): shaped like
cluster.yaml and the KubeRay RayJob, a 0-CPU head and a GPU-like worker type at 0 of at most 2
nodes that declares `simulated_gpu`, which the runs ask for instead of a GPU. Every job goes
through `ray job submit` with token authentication; data and runs live in the loopback S3 server.

- the VM launcher's shape (`ray up` leaves the config in the head's ~/ray_bootstrap_config.yaml):
  a training job and a sweep start with no worker node, the autoscaler adds the nodes, the runs
  finish with every epoch once and best/ in S3, and the idle nodes go away; a request larger than
  the node types allow exits in one sentence within 60 s;
- KubeRay's shape (no bootstrap file; the driver reads its RayCluster from the Kubernetes API, a
  stand-in on loopback): the RayJob's driver path trains through;
- a provider that never delivers a node (every launch fails, as with a GPU quota of 0): the run
  ends within train.capacity_timeout_s with one sentence naming capacity and the node type, and
  nothing is left running or launching.
"""

from __future__ import annotations

import json
import time

import boto3
import pytest
from autoscaling import (
    GPU_STAND_IN,
    REPO,
    WORKER_TYPE,
    KubernetesApiStandIn,
    fake_cluster_config,
    ray_cluster_like_the_rayjob,
)
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, job_submit, sets
from run_history import reported_history

from simpsons.report import OUTPUT_FILES

BUCKET = "autoscaling"
DATA = f"s3://{BUCKET}/datasets/tiny/v1"
RAY = str(VENV_BIN / "ray")
ON_STAND_IN_GPUS = {"train.resources_per_worker": f"{{{GPU_STAND_IN}: 1}}", "train.use_gpu": "false"}
HEAD_RESOURCES = {"trial_driver": 16}  # as cluster.yaml's head: sweeps' trial drivers run there

_AUTOSCALER_STATE = """
import json, ray
ray.init()
from simpsons.cluster import autoscaler_state
print(json.dumps(autoscaler_state()))
"""


@pytest.fixture(scope="module")
def data(s3_server, packed_dataset) -> str:
    from simpsons import storage

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage.upload_dir(packed_dataset, DATA)
    return DATA


@pytest.fixture(scope="module")
def launcher_cluster(data, tmp_path_factory):
    """The VM launcher's shape: the head's home holds the autoscaler's config where `ray up` leaves it."""
    config = fake_cluster_config(head_resources=HEAD_RESOURCES)
    home = tmp_path_factory.mktemp("head-home")
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(config))
    with RayHead(num_cpus=0, resources=HEAD_RESOURCES, autoscaling_config=config, env={"HOME": str(home)}) as head:
        yield head


def run_overrides(run_name: str, **more) -> dict:
    return {
        "data.uri": DATA,
        **TINY_RUN,
        **ON_STAND_IN_GPUS,
        "run.storage": f"s3://{BUCKET}/runs",
        "run.name": run_name,
        **more,
    }


def submit(
    head: RayHead,
    job_id: str,
    command: tuple[str, ...],
    overrides: dict,
    timeout: float = 600,
    working_dir: bool = True,
):
    """`ray job submit` of `python <command> --set ...`; returns (exit status, what it printed, seconds).

    Without `working_dir` the job runs the repo's files in place, as a RayJob runs the image's (no
    working dir): on this one machine the fake provider's nodes share the head's session folder, so
    a node that goes away may delete the unpacked working dir a long-running driver still runs in."""
    started = time.monotonic()
    if working_dir:
        cmd = job_submit(job_id, *command, *sets(overrides))
    else:
        script, *args = command
        absolute = [str(REPO / a) if a.startswith(("jobs/", "configs/")) else a for a in (script, *args)]
        cmd = [RAY, "job", "submit", "--submission-id", job_id, "--", "python", *absolute, *sets(overrides)]
    done = head.run(cmd, head.job_client_env(), timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def job_logs(head: RayHead, job_id: str) -> str:
    """The driver's output as `ray job logs` gives it (submit's own output repeats its tail)."""
    return head.run([RAY, "job", "logs", job_id], head.job_client_env(), timeout=60).stdout


def user_error(head: RayHead, job_id: str) -> str:
    """The one line the job printed for the user (cli.run_job: 'error: ...')."""
    errors = {line for line in job_logs(head, job_id).splitlines() if line.startswith("error: ")}
    assert len(errors) == 1, job_logs(head, job_id)[-3000:]
    return errors.pop()


def worker_nodes(head: RayHead) -> list[dict]:
    return [n for n in head.live_nodes() if GPU_STAND_IN in n["resources"]]


def wait_until_no_worker_node(head: RayHead, timeout: float = 120) -> None:
    """The autoscaler removes idle nodes (idle_timeout_minutes: 3 s in these configs).

    The bound is below the 180 s after which the autoscaler drops a request for worker nodes that a
    Train run never withdrew (a controller killed with its Tune trial): such a leftover fails here."""
    deadline = time.monotonic() + timeout
    while nodes := worker_nodes(head):
        if time.monotonic() > deadline:
            alive = [(a["class_name"], a["node_id"], a["pid"]) for a in head.state("actors", state="ALIVE")]
            raise AssertionError(f"worker nodes still up after {timeout:.0f} s: {nodes}; actors alive: {alive}")
        time.sleep(0.5)


def assert_trained(run_name: str, epochs: int, output: str) -> None:
    ran = [entry["epoch"] for entry in reported_history(BUCKET, "runs", run_name)]
    assert ran == list(range(epochs)), f"every epoch once, in order: {ran}\n{output[-3000:]}"
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run_name}/best/")
    assert set(OUTPUT_FILES) <= {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}


def test_a_job_starts_with_no_worker_node_and_the_autoscaler_brings_and_removes_them(launcher_cluster):
    head = launcher_cluster
    assert worker_nodes(head) == [], "the cluster must start with the head alone"
    code, output, _ = submit(head, "scale-from-zero", SMOKE_TRAIN, run_overrides("from-zero", **{"train.workers": 2}))
    assert code == 0, output[-6000:]
    assert "Not checked whether the cluster can hold" not in output  # the bootstrap file named the node types
    assert f"Adding 1 node(s) of type {WORKER_TYPE}" in output or "Adding 2 node(s)" in output, output[-4000:]
    assert_trained("from-zero", epochs=1, output=output)
    wait_until_no_worker_node(head)


def test_a_request_larger_than_the_node_types_allow_exits_in_one_sentence(launcher_cluster):
    code, output, seconds = submit(
        launcher_cluster, "too-large", SMOKE_TRAIN, run_overrides("too-large", **{"train.workers": 3}), timeout=120
    )
    assert code != 0 and seconds < 60, (code, seconds, output[-3000:])
    assert "Job entrypoint command failed with exit code 2" in output, output[-3000:]
    error = user_error(launcher_cluster, "too-large")
    assert "asks for 3 Ray Train worker(s) with 1 CPU, 1 simulated_gpu each" in error
    assert (
        f"its autoscaler can add up to 2 x {WORKER_TYPE} {{CPU: 2, simulated_gpu: 1}}, at most 2 in all) can hold 2"
        in error
    )
    assert worker_nodes(launcher_cluster) == []  # refused before asking for anything


def test_a_sweep_starts_with_no_worker_node_and_finishes(launcher_cluster):
    head = launcher_cluster
    wait_until_no_worker_node(head)
    overrides = {
        **run_overrides("unused"),
        "optim.epochs": 2,
        "train.workers": 1,
        "tune.name": "sweep-from-zero",
        "tune.num_samples": 2,
        "tune.max_concurrent_trials": 2,
    }
    command = ("jobs/tune.py", "--config", "configs/tune.yaml")
    code, output, _ = submit(head, "sweep-from-zero", command, overrides, working_dir=False)
    assert code == 0, output[-6000:]
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="runs/sweep-from-zero/")
    names = {item["Key"].removeprefix("runs/sweep-from-zero/") for item in listed.get("Contents", [])}
    assert "trials.csv" in names and {f"best/{name}" for name in OUTPUT_FILES} <= names, sorted(names)[:40]
    wait_until_no_worker_node(head)


def test_the_rayjob_driver_reads_its_raycluster_and_trains(data, tmp_path):
    """What a RayJob's entrypoint meets: a head with 0 CPUs, no ~/ray_bootstrap_config.yaml, the
    GPU group at 0 pods, and KubeRay's variables naming the RayCluster; the driver reads it from the
    Kubernetes API (the stand-in) and converts it the way KubeRay's autoscaler does."""
    config = fake_cluster_config()
    with KubernetesApiStandIn(ray_cluster_like_the_rayjob(), tmp_path) as api:
        env = {**api.env, "HOME": str(tmp_path)}  # no bootstrap file there
        with RayHead(num_cpus=0, autoscaling_config=config, env=env) as head:
            overrides = run_overrides("rayjob", **{"train.workers": 2})
            code, output, _ = submit(head, "rayjob-like", SMOKE_TRAIN, overrides)
            assert code == 0, output[-6000:]
            assert api.requests, "the driver never asked the Kubernetes API for its RayCluster"
            assert "Not checked whether the cluster can hold" not in output, output[-3000:]
            assert_trained("rayjob", epochs=1, output=output)
            # The same cluster refuses what its RayCluster's node types cannot hold, naming them.
            code, output, seconds = submit(head, "rayjob-too-large", SMOKE_TRAIN, {**overrides, "train.workers": 3})
            # Refused by the driver's check, not after train.capacity_timeout_s (1,200 s by default):
            # the bound leaves room for a job's start on a loaded machine (67 s seen at load 6-9).
            assert code != 0 and seconds < 150, (code, seconds, output[-3000:])
            assert f"up to 2 x {WORKER_TYPE}" in user_error(head, "rayjob-too-large")


def test_capacity_that_never_comes_ends_the_run_with_a_sentence_and_leaves_nothing(data, tmp_path):
    """Every launch of the worker type fails (its object store is larger than this machine, as a
    cloud refuses an instance over quota); no source names the node types here, so the driver says
    so once and leaves the verdict to the autoscaler and train.capacity_timeout_s."""
    config = fake_cluster_config(worker_extra={"object_store_memory": 10**15})
    with RayHead(num_cpus=0, autoscaling_config=config, env={"HOME": str(tmp_path)}) as head:
        overrides = run_overrides("no-capacity", **{"train.workers": 1, "train.capacity_timeout_s": 20})
        code, output, seconds = submit(head, "no-capacity", SMOKE_TRAIN, overrides, timeout=300)
        assert code != 0, output[-4000:]
        logs = job_logs(head, "no-capacity")
        unchecked = {line for line in logs.splitlines() if "Not checked whether the cluster can hold" in line}
        assert len(unchecked) == 1 and "1 worker(s)" in unchecked.pop(), logs[-4000:]
        error = user_error(head, "no-capacity")
        assert error.startswith("error: No capacity came for the run: it waited 20 s for 1 Ray Train worker(s)")
        assert f"launch(es) of {WORKER_TYPE} not joined yet" in error and "quota" in error, error
        # Submission and the driver's start-up (imports, joining the cluster) take tens of seconds on a
        # loaded 2-core machine; Ray's own default would wait 4 x 60 s = 240 s after them.
        assert seconds < 20 + 150, f"the run took {seconds:.0f} s to give up on a 20 s capacity timeout"
        # Nothing left: no training worker, no worker node, and the autoscaler stops launching.
        assert head.train_workers() == [] and worker_nodes(head) == []
        deadline = time.monotonic() + 60
        while True:
            state = head.run([str(VENV_BIN / "python"), "-c", _AUTOSCALER_STATE], head.driver_env(), timeout=60)
            pending = json.loads(state.stdout.strip().splitlines()[-1])["pending"]
            if not pending:
                break
            assert time.monotonic() < deadline, f"the autoscaler still launches after the run ended: {pending}"
            time.sleep(2)
