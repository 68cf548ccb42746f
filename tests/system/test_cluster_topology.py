"""The cluster's topology on one machine: a head started like cluster.yaml's and a separate worker node.

Real processes on 127.0.0.1 only (tests/ray_head.py): a `ray start --head` that offers 0 CPUs
and the `trial_driver` resource (as cluster.yaml's head type does) with token authentication,
plus a second Ray node joined to it with its own temp dir, ports and processes, standing for a
GPU worker machine: this machine has no GPU, so the node offers a custom resource, `simulated_gpu`,
in its place, and runs that must land on "GPU" nodes ask for it (train.resources_per_worker). Data and runs live in S3 on the
loopback moto server, as they must on a real multi-node cluster.

- a run the cluster can never place (`--gpu`, more workers than CPUs, a sweep with `--gpu`)
  exits 2 at once with one sentence, instead of Ray Train retrying for ever;
- a local dataset or a local run.storage is refused before any worker starts;
- (a) `ray job submit ... jobs/train.py` trains on the worker node; nothing trains on the head;
  the worker node is lost whole mid-run (every process of it SIGKILLed by pid), a replacement
  joins as the autoscaler would start one, and the run resumes from its last checkpoint in S3 and
  finishes with every epoch exactly once;
- (b) a sweep's trial drivers run on the head (through `trial_driver`), never on the worker
  node; a trial whose driver is killed is retried by Tune and its Train run resumes.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import time
import urllib.error
import urllib.request

import boto3
import pytest
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, job_submit, sets
from run_history import assert_finished_after_resuming, wait_for_checkpoint

BUCKET = "topology"
DATA = f"s3://{BUCKET}/datasets/tiny/v1"
RUNS = "runs"
PYTHON = str(VENV_BIN / "python")
RAY = str(VENV_BIN / "ray")
WORKER_CPUS = 4  # logical CPUs of the worker node (2 real cores here)
WORKER_GPUS = {"simulated_gpu": 2}  # stands for the worker node's GPUs
ON_GPUS = ["--set", "train.resources_per_worker={simulated_gpu: 1}"]  # one "GPU" per Train worker


class Cluster:
    def __init__(self, head: RayHead):
        self.head = head
        self.worker = head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)

    def replace_worker(self) -> None:
        """A fresh node in place of the lost one, as the autoscaler starts one for pending work."""
        self.worker = self.head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)


@pytest.fixture(scope="module")
def cluster(s3_server, packed_dataset):
    from simpsons import storage

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage.upload_dir(packed_dataset, DATA)
    # As cluster.yaml's head type: no CPUs or GPUs for the scheduler, 16 trial-driver slots.
    with RayHead(num_cpus=0, resources={"trial_driver": 16}) as head:
        yield Cluster(head)


def small_run(*flags: str, data: str = DATA, storage_uri: str = f"s3://{BUCKET}/{RUNS}") -> list[str]:
    """Overrides that keep a run tiny, then `flags` (later --set values win)."""
    return [*sets({"data.uri": data, **TINY_RUN, "run.storage": storage_uri}), *flags]


def spawn_driver(head: RayHead, script: str, config: str, *flags: str):
    """`python <script> --config <config>` as a driver on the head, with small_run's overrides, then `flags`."""
    return head.spawn([PYTHON, script, "--config", config, *small_run(*flags)], head.driver_env())


def user_error(done) -> str:
    """The one line a failed job prints for the user (cli.run_job: 'error: ...', exit 2)."""
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Refused before anything starts


# Without the check, Ray Train waits 60 s for the worker group, fails, and retries for ever. The
# subprocess limit below is a hang guard, not a speed target: on a quiet machine the refusal
# comes in seconds (Python, torch and Ray imports plus joining the cluster).
@pytest.mark.parametrize(
    "job, flags, asked",
    [
        ("train", ["--gpu"], "asks for 2 Ray Train worker(s) with 1 CPU, 1 GPU each"),
        ("train", ["--workers", "9"], "asks for 9 Ray Train worker(s) with 1 CPU each"),
        ("train", [*ON_GPUS, "--workers", "3"], "asks for 3 Ray Train worker(s) with 1 CPU, 1 simulated_gpu each"),
        ("tune", ["--gpu"], "asks for 1 Ray Train worker(s) with 1 CPU, 1 GPU each"),
    ],
)
def test_a_run_the_cluster_cannot_place_exits_2_at_once(cluster, job, flags, asked):
    config = {"train": "configs/smoke.yaml", "tune": "configs/tune.yaml"}[job]
    extra = ["--set", "tune.num_samples=1", "--set", "train.workers=1"] if job == "tune" else []
    done = cluster.head.run(
        [PYTHON, f"jobs/{job}.py", "--config", config, *small_run(*extra), *flags],
        cluster.head.driver_env(),
        timeout=120,
    )
    error = user_error(done)
    assert asked in error, error
    # What exists (both nodes, the worker's CPUs) and what to change.
    assert "2 node(s)" in error and f"CPU: {WORKER_CPUS}" in error and "no autoscaler" in error, error
    assert "simulated_gpu: 2" in error, error
    assert "lower train.workers" in error, error
    if "--gpu" in flags:
        assert "can hold 0" in error and "set train.use_gpu=false" in error, error
    assert not cluster.head.train_workers()  # nothing was started


@pytest.mark.parametrize(
    "where, flags, named",
    [
        ("dataset", ["--set", "data.uri={packed}"], "The dataset {packed} is a local folder"),
        ("storage", ["--set", "run.storage=./runs"], "run.storage {repo}/runs is a local folder"),
    ],
)
def test_local_folders_are_refused_on_a_multinode_cluster(cluster, packed_dataset, where, flags, named):
    from ray_head import REPO

    flags = [f.format(packed=packed_dataset) for f in flags]
    done = cluster.head.run(
        [PYTHON, "jobs/train.py", "--config", "configs/smoke.yaml", *small_run(*flags)],
        cluster.head.driver_env(),
        timeout=120,
    )
    error = user_error(done)
    assert named.format(packed=packed_dataset, repo=REPO) in error, error
    assert "nodes other than the driver's" in error and "s3://" in error, error


# ---------------------------------------------------------------------------------------------
# (a) a submitted job trains on the worker node; the node is lost, a replacement joins, the run resumes


def test_a_submitted_job_trains_on_the_worker_node_only_and_resumes_on_a_replacement_when_it_is_lost(cluster):
    # 10 short epochs (1-3 s each here): the kill lands once epoch 2's checkpoint is in S3, 7 are left.
    head, epochs, run_name, job_id = cluster.head, 10, "node-lost", "topology-submit"
    # Token authentication is on: the job API refuses a request that carries no token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    # The command a user runs, from the repo root: a relative config path plus overrides.
    flags = small_run(*sets({"optim.epochs": epochs, "run.name": run_name}), *ON_GPUS)
    job = head.spawn(job_submit(job_id, *SMOKE_TRAIN, *flags), head.job_client_env())
    wait_for_checkpoint(BUCKET, f"{RUNS}/{run_name}", 2, job)
    lost = cluster.worker
    workers = head.actors("RayTrainWorker", state="ALIVE")
    assert len(workers) == 2 and {w["node_id"] for w in workers} == {lost.node_id}, (workers, lost.node_id)
    pids = lost.pids()
    # Every process killed belongs to this test's node: lost.pids() finds them by a marker whose value
    # is the node's own mkdtemp folder, which only processes started from that node inherit. (A second
    # check against the head's temp dir flaked: Ray may start a worker with an environment of its own
    # making that keeps the node's marker but not every head variable.)
    assert pids, "the worker node has no processes to kill"
    lost.kill()  # raylet, agents and both Train workers at once
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in pids):
        assert time.monotonic() < deadline, "the lost node's processes are still running"
        time.sleep(0.2)
    cluster.replace_worker()

    assert job.wait(timeout=400) == 0 and f"Job '{job_id}' succeeded" in job.output, job.output[-6000:]
    assert_finished_after_resuming(BUCKET, RUNS, run_name, job.output, epochs)
    # The resumed epochs trained on the replacement node; nothing trained on the head.
    alive = [w for w in head.actors("RayTrainWorker") if w["node_id"] == cluster.worker.node_id]
    assert len(alive) == 2, head.actors("RayTrainWorker")
    assert head.node_id_of_head() not in {w["node_id"] for w in head.actors("RayTrainWorker")}
    # The controller stays with the job's driver on the head; it trains nothing.
    controllers = head.actors("TrainController")
    assert controllers and {c["node_id"] for c in controllers} == {head.node_id_of_head()}, controllers

    # The working dir the job ran in (unpacked on the head): .gitignore/.rayignore kept the
    # virtualenv, runs, data and caches out of it. (The driver's dataset download lands in its
    # ./cache, smoke.yaml's data.cache_dir, in that copy: a datasets/ folder of its own.)
    unpacked = [
        path
        for path in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
        if path.is_dir()
    ]
    assert len(unpacked) == 1, unpacked
    assert (unpacked[0] / "jobs" / "train.py").is_file() and (unpacked[0] / "configs" / "smoke.yaml").is_file()
    assert not {".venv", ".git", "runs", "data"} & {p.name for p in unpacked[0].iterdir()}
    assert {p.name for p in (unpacked[0] / "cache").glob("*")} <= {"datasets"}
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < 5e6, f"the uploaded working dir holds {size / 1e6:.1f} MB"
    # Progress and metrics are in `ray job logs`: every epoch's summary and the export line.
    logs = head.run([RAY, "job", "logs", job_id], env=head.job_client_env(), timeout=60).stdout
    assert all(f"epoch {e}/{epochs} train loss" in logs for e in range(1, epochs + 1)), logs[-4000:]
    assert f"-> s3://{BUCKET}/{RUNS}/{run_name}/best" in logs, logs[-4000:]
    # Neither the cluster token nor the S3 secret key shows up in what the user sees.
    for secret in (head.token_path.read_text(), os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in job.output and secret not in logs
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"{RUNS}/{run_name}/best/")
    assert all(item["Size"] > 0 for item in listed["Contents"])


def test_a_relative_run_storage_is_refused_under_a_working_dir_and_nothing_is_written(cluster, packed_dataset):
    """The driver runs in Ray's unpacked copy of the working dir: `./runs-wd` would put checkpoints
    in Ray's package cache (deleted later), not in the submitter's ./runs-wd."""
    head = cluster.head
    flags = small_run(*sets({"run.storage": "./runs-wd", "run.name": "wd"}))
    done = head.run(job_submit("relative-storage", *SMOKE_TRAIN, *flags), head.job_client_env(), 240)
    assert done.returncode != 0, done.stdout[-3000:]
    logs = head.run([RAY, "job", "logs", "relative-storage"], env=head.job_client_env(), timeout=60).stdout
    errors = {line for line in logs.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and "run.storage ./runs-wd is relative, but this job runs in the copy" in errors.pop()
    assert not list(head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/*/runs-wd"))


# ---------------------------------------------------------------------------------------------
# (b) trial drivers on the head; a killed one is retried and its Train run resumes


def trial_drivers(head: RayHead) -> list[dict]:
    """The Tune trial actors (the function trainable running each trial's TorchTrainer)."""
    return head.actors("ImplicitFunc")


def test_sweep_trial_drivers_stay_on_the_head_and_a_killed_one_resumes(cluster):
    head, epochs, sweep = cluster.head, 8, "placed"
    one_trial = {"run.storage": f"s3://{BUCKET}/sweeps", "tune.name": sweep, "tune.num_samples": 1}
    one_trial |= {"tune.scheduler": "fifo", "optim.epochs": epochs, "train.workers": 1}
    driver = spawn_driver(head, "jobs/tune.py", "configs/tune.yaml", *sets(one_trial))
    wait_for_checkpoint(BUCKET, f"sweeps/{sweep}/runs", 2, driver)
    running = [a for a in trial_drivers(head) if a["state"] == "ALIVE"]
    assert len(running) == 1, trial_drivers(head)
    victim = running[0]["pid"]
    # Only ever kill a process of this test's cluster, and one on the head, not on the worker node.
    assert victim in head.leftover_pids() and victim not in cluster.worker.pids(), victim
    os.kill(victim, signal.SIGKILL)

    assert driver.wait(timeout=400) == 0, driver.output[-6000:]
    drivers = trial_drivers(head)
    assert len(drivers) == 2, drivers  # the killed one and its retry
    assert {a["node_id"] for a in drivers} == {head.node_id_of_head()}, drivers
    assert head.node_id_of_head() not in {w["node_id"] for w in head.actors("RayTrainWorker")}

    s3 = boto3.client("s3")
    rows = list(
        csv.DictReader(
            io.StringIO(s3.get_object(Bucket=BUCKET, Key=f"sweeps/{sweep}/trials.csv")["Body"].read().decode())
        )
    )
    assert [(r["status"], r["epochs_run"]) for r in rows] == [("completed", str(epochs))], rows
    assert_finished_after_resuming(
        BUCKET, f"sweeps/{sweep}/runs", f"{sweep}-{rows[0]['trial_id']}", driver.output, epochs, exported=False
    )
