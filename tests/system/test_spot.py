"""A spot reclaim on the multi-node loopback cluster (tests/ray_head.py), with real processes only.

The head is started as cluster.yaml's (no CPUs, `trial_driver`), a second Ray node stands for a
GPU worker machine (its `simulated_gpu` resource in place of GPUs, as in test_cluster_topology.py),
and data and runs live on the loopback S3 server.

1. A reclaim with notice: the spot watcher (`python -m simpsons.spot watch`, as cluster.yaml
   starts it on every worker) polls a loopback HTTP server standing in for EC2's instance
   metadata; the test posts a notice there with a deadline 25 s ahead. The watcher drains the
   worker node as preempted; the workers take a just-in-time checkpoint mid-epoch, inside the
   deadline, and train on until the node is killed; a replacement node joins and the run
   resumes from that step and finishes with every batch of every epoch trained once, although
   train.max_failures is 0: the restart is charged to train.max_preemptions.
2. A plain node loss (no notice) is still a failure: Ray charges its restart to train.max_failures,
   and train.checkpoint_every_steps' periodic checkpoints let it resume mid-epoch.

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
from fake_imds import FakeImds
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, sets
from run_history import reported_history, wait_for_checkpoint

BUCKET = "spot"
DATA = f"s3://{BUCKET}/datasets/tiny/v1"
RUNS = "runs"
WORKER_CPUS, WORKER_GPUS = 4, {"simulated_gpu": 2}
# Enough that the run still trains when a noticed node goes, NOTICE_S after epoch 1's checkpoint
# (8 were too few on a quiet machine: the run had ended by then).
EPOCHS = 10
STEPS = 40  # per epoch: 160 training images, 2 workers, 2 images a step each (0.2-1 s a step here)
NOTICE_S = 25  # the notice's deadline, seconds ahead (EC2 gives 120, GCE and Azure 30): a few epochs


@pytest.fixture(scope="module")
def head(s3_server, packed_dataset):
    from simpsons import storage

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage.upload_dir(packed_dataset, DATA)
    with RayHead(num_cpus=0, resources={"trial_driver": 16}) as head:
        head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)
        yield head


def spot_run(head: RayHead, run_name: str, **overrides):
    """The training job as a driver on the head, small enough for 2 cores, a step logged each; a
    worker node joins first if an earlier test lost the last one."""
    if not any(node.resources == WORKER_GPUS for node in head.nodes):
        head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)
    values = {**TINY_RUN, "data.uri": DATA, "run.storage": f"s3://{BUCKET}/{RUNS}", "run.name": run_name}
    values |= {"optim.epochs": EPOCHS, "optim.batch_size": 4, "train.log_every": 1, "train.max_failures": 0}
    values |= {"train.resources_per_worker": "{simulated_gpu: 1}", "train.preemption_check_steps": 2, **overrides}
    return head.spawn([str(VENV_BIN / "python"), *SMOKE_TRAIN, *sets(values)], head.driver_env())


def lose(head: RayHead, node) -> None:
    """The node goes: every one of its processes SIGKILLed, as when its VM is reclaimed."""
    assert node.pids(), "the node has no processes to kill"
    node.kill()
    head.nodes.remove(node)
    node.stop()


def test_a_noticed_reclaim_checkpoints_in_time_and_resumes_at_that_step(head):
    run_name = "reclaimed"
    prefix = f"{RUNS}/{run_name}"
    driver = spot_run(head, run_name)
    wait_for_checkpoint(BUCKET, prefix, 1, driver)
    worker = head.nodes[-1]

    with FakeImds() as imds:
        watcher = head.spawn(
            [str(VENV_BIN / "python"), "-m", "simpsons.spot", "--address", head.address, "--node-id", worker.node_id,
             "watch", "--metadata-url", imds.url, "--poll-s", "0.5"],
            head.driver_env(),
        )  # fmt: skip
        watcher.wait_for_line("Watching", timeout=60)
        before = set(checkpoints(prefix))
        noticed = time.time()
        deadline = noticed + NOTICE_S
        stamp = datetime.fromtimestamp(round(deadline), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        imds.notice = {"action": "terminate", "time": stamp}
        assert watcher.wait(timeout=60) == 0, watcher.output
        assert "Drained Ray node" in watcher.output, watcher.output

    # The run trains on after its checkpoint until the node goes at the deadline: what it trains
    # after its last checkpoint is the work a reclaim loses.
    seen: dict[str, tuple[int, int, float]] = {}  # checkpoint folder -> (epoch, steps done, first seen)

    def look() -> None:
        for folder, position in checkpoints(prefix).items():
            if folder not in before:
                seen.setdefault(folder, (*position, time.time()))

    while time.time() < deadline:
        assert driver.popen.poll() is None, driver.output[-6000:]
        look()
        time.sleep(0.2)
    lose(head, worker)
    killed = time.time()
    killed_at = time.monotonic() - driver.started  # on the driver's output clock
    # The last call aims just before the deadline, so its checkpoint can land between the last
    # poll and the kill: one more look, now that nothing on the node can write.
    look()
    head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)  # as the autoscaler replaces it

    assert driver.wait(timeout=400) == 0, driver.output[-8000:]
    assert "Source: preemption" in driver.output, driver.output[-8000:]  # Ray's budget for it, not max_failures
    mid_epoch = sorted((t, e, k) for e, k, t in seen.values() if k < STEPS)
    assert mid_epoch and mid_epoch[0][0] < deadline, f"no checkpoint within the notice's {NOTICE_S} s: {seen}"
    # The run resumed from its latest checkpoint: one that was in S3 before the node went.
    (resumed,) = re.findall(r"Resuming from the checkpoint of epoch (\d+)( step \d+)?;", driver.output)
    epoch, step = int(resumed[0]), int(resumed[1].split()[-1]) if resumed[1] else STEPS
    resumed_from = next((t for e, k, t in seen.values() if (e, k) == (epoch, step)), None)
    assert resumed_from is not None, f"resumed from epoch {epoch} step {step}, not a checkpoint of the notice: {seen}"
    settled = [(e, k) for e, k, t in seen.values() if t < killed - 2]  # registered by Ray for sure
    assert (epoch, step) >= max(settled, default=(0, 0)), (epoch, step, seen)

    history = reported_history(BUCKET, RUNS, run_name)
    assert [h["epoch"] for h in history] == list(range(EPOCHS))  # every epoch once
    for h in history:  # every batch once: the attempts' step ranges tile each epoch
        expected = [[0, step], [step, STEPS]] if h["epoch"] == epoch and step < STEPS else [[0, STEPS]]
        assert h["trained_steps"] == expected, (h["epoch"], h["trained_steps"])

    resume_line = next(line for line in driver.lines if "Resuming from the checkpoint" in line)
    figures = {
        "notice_to_first_checkpoint_s": round(mid_epoch[0][0] - noticed, 1),
        "checkpoints_after_notice": [[e, k] for e, k, _ in sorted(seen.values(), key=lambda v: v[2])],
        "resumed_from": [epoch, step],
        "last_checkpoint_before_deadline_s": round(deadline - resumed_from, 1),
        "seconds_lost": round(killed - resumed_from, 1),
        "steps_lost": _steps_after(driver.output, epoch, step, resume_line),
        "kill_to_resumed_s": round(_seconds_of(driver, resume_line) - killed_at, 1),
        "notice_s": NOTICE_S,
        "check_every_steps": 2,
    }
    print("spot reclaim:", json.dumps(figures))


def checkpoints(prefix: str) -> dict[str, tuple[int, int]]:
    """Complete checkpoints in S3 under `prefix`: folder -> (epoch, steps of it done: STEPS at its end)."""
    s3 = boto3.client("s3")
    keys = {
        item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/checkpoint_").get("Contents", [])
    }
    found = {}
    for key in keys:
        folder = key.rsplit("/", 1)[0]
        if key.endswith("/metrics.json") and f"{folder}/checkpoint.pt" in keys:
            try:
                metrics = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            except s3.exceptions.NoSuchKey:  # pruned since the listing
                continue
            found[folder] = (metrics["epoch"], metrics.get("step", STEPS))
    return found


def _steps_after(output: str, epoch: int, step: int, until: str) -> int:
    """Training steps rank 0 logged after step `step` of `epoch` (0-based) and before `until`."""
    logged = re.findall(r"epoch (\d+)/\d+ step (\d+)/", output.split(until, 1)[0])
    done = [(int(e) - 1, int(k)) for e, k in logged]
    return len([position for position in done if position > (epoch, step)])


def _seconds_of(process, text: str) -> float:
    """When (seconds after its start) `process` printed its first line containing `text`."""
    return next(t for t, line in zip(process.seconds, process.lines) if text in line)


def test_periodic_checkpoints_resume_a_node_lost_without_notice_mid_epoch(head):
    """train.checkpoint_every_steps takes the same path as the notice's checkpoint. Without a notice
    the loss is a failure, not a preemption: Ray charges the restart to train.max_failures (1 here;
    with 0 the run would end there)."""
    run_name, every, epochs = "periodic", 5, 4  # the node goes early in epoch 1: 2 epochs and more are left
    driver = spot_run(
        head, run_name, **{"optim.epochs": epochs, "train.checkpoint_every_steps": every, "train.max_failures": 1}
    )
    wait_for_checkpoint(BUCKET, f"{RUNS}/{run_name}", 1, driver)
    prefix = f"{RUNS}/{run_name}"
    # Lose the node soon after a checkpoint early in an epoch: well before that epoch's end.
    while not any(e >= 1 and k == every for e, k in checkpoints(prefix).values()):
        assert driver.popen.poll() is None, driver.output[-6000:]
        time.sleep(0.2)
    time.sleep(2)
    lose(head, head.nodes[-1])
    head.add_node(num_cpus=WORKER_CPUS, resources=WORKER_GPUS)

    assert driver.wait(timeout=400) == 0, driver.output[-8000:]
    assert "Source: worker group" in driver.output and "Error count: 1 (max allowed: 1)" in driver.output, (
        driver.output[-8000:]
    )
    assert "Source: preemption" not in driver.output
    (epoch, step), *_ = re.findall(r"Resuming from the checkpoint of epoch (\d+) step (\d+);", driver.output)
    epoch, step = int(epoch), int(step)
    assert step % every == 0 and 0 < step < STEPS, step
    history = reported_history(BUCKET, RUNS, run_name)
    assert [h["epoch"] for h in history] == list(range(epochs))
    for h in history:
        expected = [[0, step], [step, STEPS]] if h["epoch"] == epoch else [[0, STEPS]]
        assert h["trained_steps"] == expected, (h["epoch"], h["trained_steps"])


_NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({n["NodeID"]: [n["Alive"], n["DeathReason"], n["DeathReasonMessage"]] for n in ray.nodes()}))
"""


def test_the_pod_hook_drains_its_node_as_preempted_and_holds_the_pod_until_the_deadline(head):
    """What deploy/k8s's preStop hook runs, `drain --deadline-s N --wait`. The node here runs no
    work, so Ray ends it at once (a busy one stays until the deadline: the first test), recording
    that it went as preempted: what makes Ray Train charge the loss to the preemption budget."""
    from ray.core.generated.common_pb2 import NodeDeathInfo

    node = head.add_node(num_cpus=1)
    try:
        started = time.time()
        hook = head.spawn(
            [str(VENV_BIN / "python"), "-m", "simpsons.spot", "--address", head.address, "--node-id", node.node_id,
             "drain", "--deadline-s", "10", "--reason", "evicted by the test", "--wait"],
            head.driver_env(),
        )  # fmt: skip
        hook.wait_for_line("Drained Ray node", timeout=60)
        for _ in range(30):
            done = head.run([str(VENV_BIN / "python"), "-c", _NODES, head.address], head.driver_env(), timeout=90)
            nodes = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
            if not nodes[node.node_id][0]:
                break
            time.sleep(1)
        alive, reason, message = nodes[node.node_id]
        assert not alive and reason == NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED, nodes
        assert message.startswith("evicted by the test"), message
        assert hook.wait(timeout=60) == 0 and time.time() >= started + 10  # the hook held the pod until then
    finally:
        head.nodes.remove(node)
        node.stop()
