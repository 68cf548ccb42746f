"""The object store goes away for 20 s in the middle of a run and comes back.

The run is also the end-to-end check of object storage: a dataset prepared into S3, read from it by
the Train workers, and the run's checkpoints, TensorBoard logs and best/ stored there.

A moto server of this module's own on 127.0.0.1 is stopped and started again on the same port
(moto keeps its buckets in this process, so what was stored before the outage is still there, as
with a restarted MinIO or a network partition).
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer
from ray_head import TWO_CPU_WORKERS
from s3_objects import objects
from synthetic import CLASSES, make_image_tree

from simpsons.cluster import free_port
from simpsons.config import load_config
from simpsons.report import OUTPUT_FILES

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

    def new_bucket(self) -> str:
        bucket = f"outage-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str) -> list[str]:
        return list(objects(bucket, client=self.client()))


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


def test_folder_to_s3_to_two_worker_training_that_rides_out_an_outage_between_checkpoints(
    ray_cluster, flaky_s3, tmp_path
):
    """End to end through object storage: test-written JPEGs -> prepare -> S3 -> a 2-worker run that
    reads the dataset from S3 and keeps its storage there -> best/ in S3; the store goes away for
    OUTAGE_S once the first checkpoint is stored, and the run finishes with every epoch once."""
    from simpsons.driver import fit
    from simpsons.prepare import prepare_dataset

    bucket = flaky_s3.new_bucket()
    source = make_image_tree(tmp_path / "photos", per_split={"train": 40, "val": 12}, size=48)
    prepare = dict(
        source=str(source),
        dest=f"s3://{bucket}/simpsons",
        name="synthetic",
        stored_size=40,
        workers=1,
        cache_dir=str(tmp_path / "prepare_cache"),
        endpoint=flaky_s3.endpoint,
    )
    prepared = prepare_dataset(**prepare)
    assert prepared.uri == f"s3://{bucket}/simpsons/datasets/synthetic/v1" and prepared.images == 4 * 52

    epochs = 4
    cfg = load_config(
        None,
        [
            f"optim.epochs={epochs}",
            *TWO_CPU_WORKERS,
            "train.histogram_every=0",
            f"data.uri={prepared.uri}",
            f"data.cache_dir={tmp_path / 'node_cache'}",
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
        report = fit(cfg)
        finished = time.monotonic()
    finally:
        outage.join(timeout=OUTAGE_S + 60)
    # The outage fell inside the run: it began before the run ended and the run outlived it, so the
    # reports (each stores a checkpoint) in between had to wait for the store.
    assert log["down"] < log["up"] < finished, log
    assert [h["epoch"] for h in report["history"]] == list(range(epochs))  # each epoch exactly once

    # Two workers on one node shared one download into the node-local cache.
    assert len(list((tmp_path / "node_cache" / "datasets").glob("*/manifest.json"))) == 1
    # best/ is in S3, with the whole history and per-class metrics for every class of the data.
    client = flaky_s3.client()
    run = {key.removeprefix("runs/outage/"): entry for key, entry in objects(bucket, "runs/outage/", client).items()}

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"runs/outage/{key}")["Body"].read()

    assert set(OUTPUT_FILES) <= {k[len("best/") :] for k in run if k.startswith("best/")}
    metrics = json.loads(get("best/metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == list(range(epochs)) and metrics["accuracy"] == report["accuracy"]
    scored = {row["class"]: row for row in metrics["per_class"] if row["support"] > 0}
    assert set(scored) == set(CLASSES) and all(0 <= row["f1"] <= 1 for row in scored.values())
    assert {row["support"] for row in scored.values()} == {12}
    rows = list(csv.DictReader(io.StringIO(get("best/per_class.csv").decode())))
    assert {r["class"] for r in rows if r["support"] != "0"} == set(CLASSES)
    # Ray's checkpoints (no more than it keeps) and the TensorBoard logs are in S3 too; no object
    # carries the credentials.
    checkpoints = {k.split("/")[0] for k in run if k.endswith("/checkpoint.pt") and not k.startswith("best/")}
    assert 1 <= len(checkpoints) <= cfg.train.checkpoints_to_keep + 1, checkpoints
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in run)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()  # the s3_server fixture's
    assert not any(secret in get(k) for k in run)

    # (A rerun with the same name resumes from the checkpoints in S3: tests/system/test_fault_tolerance.py.)

    # A second prepare with the same inputs uploads nothing new.
    before = {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket, "simpsons/", client).items()}
    assert prepare_dataset(**prepare).files_sent == 0
    assert {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket, "simpsons/", client).items()} == before


def test_prepare_interrupted_by_an_outage_completes_on_rerun_and_is_never_marked_complete_early(flaky_s3, tmp_path):
    from asserts import one_sentence

    from simpsons.prepare import prepare_dataset
    from simpsons.storage import StorageError

    bucket = flaky_s3.new_bucket()
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
