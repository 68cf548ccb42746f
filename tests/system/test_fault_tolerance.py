"""Fault tolerance on a real Ray head (`ray start --head`, token auth, 127.0.0.1; tests/ray_head.py).

One run meets two faults in turn:
1. A Ray Train worker process is killed from outside mid-run (found through Ray's state API, as an
   operator would find it; nothing in the training code helps): FailureConfig restarts the worker
   group, which resumes from the latest checkpoint in S3.
2. Later, the driver (`python jobs/train.py`) is killed: running the same command again resumes
   from the run's storage in S3 and finishes the configured epochs.

It is judged from what the run reported (tests/run_history.py): the `history` in the last
checkpoint's checkpoint.pt (one entry per epoch, each with its `epoch` and a `resumed` flag).
"""

from __future__ import annotations

import os
import re
import signal

import boto3
import pytest
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, sets
from run_history import assert_finished_after_resuming, wait_for_checkpoint

BUCKET, PREFIX = "fault-tolerance", "runs"
EPOCHS = 12  # the worker is killed once epoch 2's checkpoint is in S3, the driver two epochs after the
# restart (epochs take 1-3 s here): a few epochs are left for the rerun


@pytest.fixture(scope="module")
def head(s3_server):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    with RayHead(num_cpus=4) as head:
        yield head


def train_command(packed_dataset, run_name: str) -> list[str]:
    overrides = {
        **TINY_RUN,
        "data.uri": packed_dataset,
        "optim.epochs": EPOCHS,
        "train.workers": 2,
        "run.storage": f"s3://{BUCKET}/{PREFIX}",
        "run.name": run_name,
    }
    return [str(VENV_BIN / "python"), *SMOKE_TRAIN, *sets(overrides)]


def test_a_killed_train_worker_then_a_killed_driver_each_resume_and_the_run_finishes(head, packed_dataset):
    """One run meets both faults in turn, as a long job on a real cluster may."""
    run_name = "worker-then-driver-killed"
    command = train_command(packed_dataset, run_name)
    first = head.spawn(command, head.driver_env())
    first.wait_for_line("Started training worker group of size 2", timeout=180)  # then ask the state API
    workers = head.wait_for_train_workers(2)
    wait_for_checkpoint(BUCKET, f"{PREFIX}/{run_name}", 2, first)

    # 1. A Train worker: Ray restarts the worker group inside the same driver.
    victim = workers[-1]["pid"]
    # Only ever kill a process of this test's own cluster (its environment names the head's temp dir).
    assert victim in head.leftover_pids(), f"pid {victim} is not a process of this test's Ray head"
    os.kill(victim, signal.SIGKILL)
    line = first.wait_for_line("Resuming from the checkpoint of epoch", timeout=180)
    restarted_at = int(line.split("Resuming from the checkpoint of epoch ")[1].split(";")[0])

    # 2. The driver, two checkpoints later: no chance to clean up, as when a job's process or its
    # node dies. Ray takes the run's controller and workers down with it.
    wait_for_checkpoint(BUCKET, f"{PREFIX}/{run_name}", restarted_at + 2, first)
    first.kill()
    head.wait_for_train_workers(0, timeout=60)
    second = head.spawn(command, head.driver_env())
    assert second.wait(timeout=240) == 0, second.output[-6000:]

    assert_finished_after_resuming(BUCKET, PREFIX, run_name, first.output, EPOCHS)
    (rerun_at,) = re.findall(r"Resuming from the checkpoint of epoch (\d+);", second.output)
    # From a checkpoint the restarted group wrote (S3 held epoch restarted_at + 2's at the kill; with
    # async uploads the one before it is registered with the run for sure).
    assert int(rerun_at) > restarted_at, (restarted_at, rerun_at)
