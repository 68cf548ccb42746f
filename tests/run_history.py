"""What a Ray Train run left in S3, read back with boto3: the judge of resume and node-loss tests.

The `history` in checkpoint.pt of a run's last reported checkpoint has one entry per epoch, each
with its `epoch` and a `resumed` flag (true when the epoch ran after a restart from a checkpoint).
"""

from __future__ import annotations

import io
import json
import time

import boto3
import torch

from simpsons.report import OUTPUT_FILES


def reported_history(bucket: str, prefix: str, run_name: str) -> list[dict]:
    """The `history` in checkpoint.pt of the run's last reported checkpoint in S3."""
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{run_name}/checkpoint_")
    folders = {
        item["Key"].rsplit("/", 1)[0] for item in listed.get("Contents", []) if item["Key"].endswith("/checkpoint.pt")
    }
    assert folders, f"no checkpoint under s3://{bucket}/{prefix}/{run_name}/"

    def epoch(folder: str) -> int:  # metrics.json is small; checkpoint.pt is tens of MB
        return json.loads(s3.get_object(Bucket=bucket, Key=f"{folder}/metrics.json")["Body"].read())["epoch"]

    latest = max(folders, key=epoch)
    state = torch.load(
        io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{latest}/checkpoint.pt")["Body"].read()), weights_only=True
    )
    return state["history"]


def wait_for_checkpoint(bucket: str, prefix: str, epoch: int, process, timeout: float = 300) -> None:
    """Return once a checkpoint of `epoch` or later is in S3 under `prefix` (any run below it).

    Fault tests kill something at this point: S3 is what a restart resumes from, and it is seen at
    once, where a worker's log line reaches the driver seconds late on a busy machine (a run of
    short epochs could finish before a kill timed by its output). With async uploads, waiting for
    epoch 2 leaves epochs 0 and 1 registered with the run.
    """
    s3 = boto3.client("s3")
    deadline = time.monotonic() + timeout
    while True:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        folders = [
            item["Key"]
            for page in pages
            for item in page.get("Contents", [])
            if "/checkpoint_" in item["Key"] and item["Key"].endswith("/metrics.json")
        ]
        for key in folders:
            try:
                if json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["epoch"] >= epoch:
                    return
            except s3.exceptions.NoSuchKey:  # pruned by checkpoints_to_keep since the listing
                pass
        assert process.popen.poll() is None, (
            f"the run ended before epoch {epoch}'s checkpoint: {process.output[-4000:]}"
        )
        assert time.monotonic() < deadline, (
            f"no checkpoint of epoch {epoch} under s3://{bucket}/{prefix}/ in {timeout:.0f} s"
        )
        time.sleep(0.2)


def assert_finished_after_resuming(
    bucket: str, prefix: str, run_name: str, output: str, epochs: int, exported: bool = True
) -> None:
    """Every epoch ran exactly once, in order; the ones after the failure in a run resumed from a
    checkpoint (not from scratch); and, when `exported`, best/ holds every output file."""
    history = reported_history(bucket, prefix, run_name)
    ran = [entry["epoch"] for entry in history]
    assert ran == list(range(epochs)), f"every epoch once, in order: {ran}"
    resumed = [entry["resumed"] for entry in history]
    first = resumed.index(True) if True in resumed else None
    # Epochs before the failure ran fresh, every epoch after it ran in the resumed run, and the
    # resumed run started from a checkpoint (epoch >= 1), not from scratch.
    assert first is not None, (
        f"no epoch ran after a resume: the kill came after the last checkpoint (more epochs?): {history}"
    )
    assert first >= 1 and resumed == [False] * first + [True] * (epochs - first), resumed
    assert f"Resuming from the checkpoint of epoch {first - 1}; continuing at epoch {first}." in output, output[-4000:]
    if exported:
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{run_name}/best/")
        assert set(OUTPUT_FILES) <= {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}
