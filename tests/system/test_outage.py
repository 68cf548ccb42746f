"""The object store goes away for 20 s in the middle of a run and comes back.

A moto server of this module's own on 127.0.0.1 is stopped and started again on the same port
(moto keeps its buckets in this process, so what was stored before the outage is still there, as
with a restarted MinIO or a network partition).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

from simpsons.cluster import free_port
from simpsons.config import load_config

OUTAGE_S = 20


class FlakyS3:
    """A real S3 API on 127.0.0.1 that can be taken down and brought back on the same port."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: ThreadedMotoServer | None = None
        self.up()

    def up(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def down(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def flaky_s3(s3_server):  # s3_server: the test credentials in the environment
    store = FlakyS3()
    try:
        yield store
    finally:
        store.down()


def outage_after(store: FlakyS3, ready, log: dict[str, float]) -> threading.Thread:
    """In the background: once ready() holds, stop the store for OUTAGE_S seconds, then start it again.

    `log` gets the monotonic times "down" and "up".
    """

    def run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not ready():
            time.sleep(0.2)
        store.down()
        log["down"] = time.monotonic()
        time.sleep(OUTAGE_S)
        store.up()
        log["up"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_training_rides_out_an_object_store_outage_between_checkpoints(ray_cluster, packed_dataset, flaky_s3):
    from simpsons.driver import fit

    bucket = f"outage-{uuid.uuid4().hex[:10]}"
    flaky_s3.client().create_bucket(Bucket=bucket)
    epochs = 4
    cfg = load_config(
        None,
        [
            f"optim.epochs={epochs}",
            "data.stored_size=40",
            "data.train_size=32",
            "optim.batch_size=32",
            "train.workers=2",
            "train.cpus_per_worker=1",
            "train.use_gpu=false",
            "train.histogram_every=0",
            f"run.storage=s3://{bucket}/runs",
            f"run.s3_endpoint={flaky_s3.endpoint}",
            "run.name=outage",
        ],
    )
    log: dict[str, float] = {}

    def first_checkpoint_stored() -> bool:
        try:
            return any(k.endswith("/checkpoint.pt") for k in flaky_s3.keys(bucket))
        except Exception:  # the listing itself may race the server; try again
            return False

    outage = outage_after(flaky_s3, first_checkpoint_stored, log)
    try:
        report = fit(cfg, str(packed_dataset))
        finished = time.monotonic()
    finally:
        outage.join(timeout=OUTAGE_S + 60)
    # The outage fell inside the run: it began before the run ended and the run outlived it, so the
    # reports (each stores a checkpoint) in between had to wait for the store.
    assert log["down"] < log["up"] < finished, log
    assert [h["epoch"] for h in report["history"]] == list(range(epochs))  # each epoch exactly once
    metrics = json.loads(
        flaky_s3.client().get_object(Bucket=bucket, Key="runs/outage/best/metrics.json")["Body"].read()
    )
    assert [h["epoch"] for h in metrics["history"]] == list(range(epochs))
    checkpoints = {k.split("/")[2] for k in flaky_s3.keys(bucket) if k.endswith("/checkpoint.pt") and "/best/" not in k}
    assert 1 <= len(checkpoints) <= cfg.train.checkpoints_to_keep + 1


def test_prepare_interrupted_by_an_outage_completes_on_rerun_and_is_never_marked_complete_early(flaky_s3, tmp_path):
    from asserts import one_sentence
    from synthetic import make_image_tree

    from simpsons.prepare import prepare_dataset
    from simpsons.storage import StorageError

    bucket = f"outage-{uuid.uuid4().hex[:10]}"
    flaky_s3.client().create_bucket(Bucket=bucket)
    root = make_image_tree(tmp_path / "src", per_split={"train": 120, "val": 30}, size=32)
    args = dict(
        source=str(root),
        dest=f"s3://{bucket}/p",
        stored_size=32,
        workers=1,
        cache_dir=str(tmp_path / "cache"),
        endpoint=flaky_s3.endpoint,
    )
    manifest_key = "p/datasets/simpsons/v1/manifest.json"
    seen: dict[str, int] = {}

    def upload_under_way() -> bool:
        try:
            keys = flaky_s3.keys(bucket)
        except Exception:  # the listing itself may race the server; try again
            return False
        seen["before_outage"] = len(keys)
        seen["manifest_early"] = seen.get("manifest_early", 0) or int(manifest_key in keys and len(keys) < 600)
        return len(keys) >= 20

    log: dict[str, float] = {}
    outage = outage_after(flaky_s3, upload_under_way, log)
    try:
        first = prepare_dataset(**args)
    except StorageError as exc:  # gave up during the outage: said in one sentence, finished by the re-run
        assert one_sentence(str(exc)), str(exc)
        first = None
    finally:
        outage.join(timeout=OUTAGE_S + 60)
    assert "down" in log and 20 <= seen["before_outage"] and not seen["manifest_early"]

    result = prepare_dataset(**args)
    manifest = json.loads(flaky_s3.client().get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    stored = set(flaky_s3.keys(bucket))
    assert {f"p/datasets/simpsons/v1/{k}" for k in manifest["objects"]} | {manifest_key} == stored
    assert seen["before_outage"] < len(manifest["objects"])  # the outage came in the middle of the upload
    assert result.images == 4 * 150
    if first is not None:  # it rode the outage out: the re-run had nothing to send
        assert result.files_sent == 0
