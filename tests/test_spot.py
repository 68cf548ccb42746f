"""A spot reclaim on the multi-node loopback cluster (tests/ray_head.py), with real processes only.

The head is started as cluster.yaml's (no CPUs, `trial_driver`), a second Ray node stands for a
GPU worker machine (its `simulated_gpu` resource in place of GPUs, as in test_cluster_topology.py),
and data and runs live on the loopback S3 server.

1. A reclaim with notice: the spot watcher (`python -m simpsons.spot watch`, as cluster.yaml
   starts it on every worker) polls a loopback HTTP server standing in for EC2's instance
   metadata; the test posts a notice there with a deadline 40 s ahead. The watcher drains the
   worker node as preempted; the workers take a just-in-time checkpoint mid-epoch, inside the
   deadline, and train on until the node is killed; a replacement node joins and the run
   resumes from that step and finishes with every batch of every epoch trained once, although
   train.max_failures is 0: the restart is charged to train.max_preemptions.
2. A plain node loss (no notice) is still a failure: with train.max_failures=0 the run fails.

The first test prints what the reclaim cost (run it with -s): seconds from the notice to the
checkpoint in S3, the steps and seconds trained after it (lost), and from the kill to the resumed
run's first line; bench/RESULTS.md quotes a run of it.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import boto3
import pytest
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, sets
from run_history import reported_history, wait_for_checkpoint
from test_spot_watcher import FakeImds

pytestmark = pytest.mark.slow

BUCKET = "spot"
DATA = f"s3://{BUCKET}/datasets/tiny/v1"
RUNS = "runs"
WORKER_CPUS, WORKER_GPUS = 4, {"simulated_gpu": 2}
EPOCHS = 8
STEPS = 20  # per epoch: 160 training images, 2 workers, 4 images a step each
NOTICE_S = 40  # the notice's deadline, seconds ahead (EC2 gives 120, GCE and Azure 30)


@pytest.fixture(scope="module")
def head(s3_server, packed_dataset):
    from simpsons import storage

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage.upload_dir(packed_dataset, DATA)
    with RayHead(num_cpus=0, resources={"trial_driver": 16}) as head:
        head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)
        yield head


def spot_run(head: RayHead, run_name: str, **overrides):
    """The training job as a driver on the head, small enough for 2 cores, a step logged each."""
    values = {**TINY_RUN, "data.uri": DATA, "run.storage": f"s3://{BUCKET}/{RUNS}", "run.name": run_name}
    values |= {"optim.epochs": EPOCHS, "optim.batch_size": 8, "train.log_every": 1, "train.max_failures": 0}
    values |= {"train.resources_per_worker": "{simulated_gpu: 1}", "train.preemption_check_steps": 2, **overrides}
    return head.spawn([str(VENV_BIN / "python"), *SMOKE_TRAIN, *sets(values)], head.driver_env())


def mid_epoch_checkpoints(prefix: str) -> list[dict]:
    """metrics.json of every mid-epoch checkpoint in S3 under `prefix` ({"epoch", "step", ...})."""
    s3 = boto3.client("s3")
    found = []
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/checkpoint_").get("Contents", []):
        if item["Key"].endswith("/metrics.json"):
            try:
                metrics = json.loads(s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            except s3.exceptions.NoSuchKey:  # pruned since the listing
                continue
            if "step" in metrics:
                found.append(metrics)
    return found


def lose(head: RayHead, node) -> None:
    """The node goes: every one of its processes SIGKILLed, as when its VM is reclaimed."""
    assert node.pids(), "the node has no processes to kill"
    node.kill()
    head.nodes.remove(node)
    node.stop()


def test_a_noticed_reclaim_checkpoints_in_time_and_resumes_at_that_step(head):
    run_name = "reclaimed"
    driver = spot_run(head, run_name)
    wait_for_checkpoint(BUCKET, f"{RUNS}/{run_name}", 1, driver)
    worker = head.nodes[-1]

    with FakeImds() as imds:
        watcher = head.spawn(
            [str(VENV_BIN / "python"), "-m", "simpsons.spot", "--address", head.address, "--node-id", worker.node_id,
             "watch", "--metadata-url", imds.url, "--poll-s", "0.5"],
            head.driver_env(),
        )  # fmt: skip
        watcher.wait_for_line("Watching", timeout=60)
        deadline = time.time() + NOTICE_S
        noticed = time.time()
        stamp = datetime.fromtimestamp(int(deadline), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        imds.notice = {"action": "terminate", "time": stamp}
        assert watcher.wait(timeout=60) == 0, watcher.output
        assert "Drained Ray node" in watcher.output, watcher.output

    prefix = f"{RUNS}/{run_name}"
    while not mid_epoch_checkpoints(prefix):
        assert time.time() < deadline, f"no checkpoint within the notice's {NOTICE_S} s:\n{driver.output[-6000:]}"
        assert driver.popen.poll() is None, driver.output[-6000:]
        time.sleep(0.2)
    saved = time.time()
    (jit,) = mid_epoch_checkpoints(prefix)
    time.sleep(2)  # the run trains on after the checkpoint: these steps are the work a reclaim loses
    lose(head, worker)
    killed = time.time()
    killed_at = time.monotonic() - driver.started  # on the driver's output clock
    head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)  # as the autoscaler replaces it

    assert driver.wait(timeout=400) == 0, driver.output[-8000:]
    epoch, step = jit["epoch"], jit["step"]
    line = f"Resuming from the checkpoint of epoch {epoch} step {step}; continuing at its step {step}."
    assert line in driver.output, driver.output[-8000:]
    assert "Source: preemption" in driver.output, driver.output[-8000:]  # Ray's budget for it, not max_failures

    history = reported_history(BUCKET, RUNS, run_name)
    assert [h["epoch"] for h in history] == list(range(EPOCHS))  # every epoch once
    for h in history:  # every batch once: the attempts' step ranges tile each epoch
        expected = [[0, step], [step, STEPS]] if h["epoch"] == epoch else [[0, STEPS]]
        assert h["trained_steps"] == expected, (h["epoch"], h["trained_steps"])
    assert [h["resumed"] for h in history] == [e >= epoch for e in range(EPOCHS)]

    trained_after = _last_step_logged(driver.output, epoch, before="Resuming from the checkpoint")
    figures = {
        "notice_to_checkpoint_s": round(saved - noticed, 1),
        "checkpoint_before_deadline_s": round(deadline - saved, 1),
        "steps_lost": trained_after - step,
        "seconds_lost": round(killed - saved, 1),
        "kill_to_resumed_s": round(_seconds_of(driver, line) - killed_at, 1),
        "check_every_steps": 2,
        "ray_preemption_poll_s": 5,
    }
    print("spot reclaim:", figures)
    assert figures["checkpoint_before_deadline_s"] > 0


def _last_step_logged(output: str, epoch: int, before: str) -> int:
    """The last training step of `epoch` (0-based) that rank 0 logged before the line `before`."""
    head = output.split(before, 1)[0]
    steps = re.findall(rf"epoch {epoch + 1}/{EPOCHS} step (\d+)/", head)
    return int(steps[-1]) if steps else 0


def _seconds_of(process, text: str) -> float:
    """When (seconds after its start) `process` printed its first line containing `text`."""
    return next(t for t, line in zip(process.seconds, process.lines) if text in line)


def test_a_node_lost_without_notice_is_charged_to_max_failures(head):
    run_name = "lost-unnoticed"
    driver = spot_run(head, run_name)
    wait_for_checkpoint(BUCKET, f"{RUNS}/{run_name}", 1, driver)
    lose(head, head.nodes[-1])
    assert driver.wait(timeout=300) != 0, driver.output[-8000:]
    assert "Source: worker group" in driver.output and "(max allowed: 0)" in driver.output, driver.output[-8000:]
    assert "Resuming from the checkpoint" not in driver.output
