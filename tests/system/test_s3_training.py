"""End to end through object storage: a folder of test-written JPEGs -> prepare -> S3 -> a 2-worker
CPU Ray Train run that reads the dataset from S3 and keeps its storage in S3 -> best/ in S3.

Real HTTP to a real S3 server (moto) on 127.0.0.1, a real local Ray cluster; nothing mocked.
"""

import csv
import io
import json
import uuid

import boto3
from ray_head import TWO_CPU_WORKERS
from s3_objects import objects
from synthetic import CLASSES, make_image_tree

from simpsons.config import load_config
from simpsons.prepare import prepare_dataset
from simpsons.report import OUTPUT_FILES

SECRET = "testing-secret-key"  # the conftest's; no object may contain it


def get(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_folder_to_s3_dataset_to_two_worker_training_with_s3_storage(ray_cluster, s3_server, tmp_path):
    from simpsons.driver import fit

    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    source = make_image_tree(tmp_path / "photos", per_split={"train": 40, "val": 12}, size=48)
    prepare = dict(
        source=str(source),
        dest=f"s3://{bucket}/simpsons",
        name="synthetic",
        version="v1",
        stored_size=40,
        workers=1,
        cache_dir=str(tmp_path / "prepare_cache"),
    )
    prepared = prepare_dataset(**prepare)
    assert prepared.uri == f"s3://{bucket}/simpsons/datasets/synthetic/v1" and prepared.images == 4 * 52

    overrides = [
        "optim.epochs=2",
        *TWO_CPU_WORKERS,
        f"data.uri={prepared.uri}",
        f"data.cache_dir={tmp_path / 'node_cache'}",
        f"run.storage=s3://{bucket}/runs",
        "run.name=e2e",
    ]
    cfg = load_config(None, overrides)
    report = fit(cfg)  # data.source prepared into the cache by the job itself

    # Two workers on one node shared one download into the node-local cache.
    assert len(list((tmp_path / "node_cache" / "datasets").glob("*/manifest.json"))) == 1
    # best/ is in S3, with per-class metrics for every class of the data.
    run = {key.removeprefix("runs/e2e/"): entry for key, entry in objects(bucket, "runs/e2e/").items()}
    assert set(OUTPUT_FILES) <= {k[len("best/") :] for k in run if k.startswith("best/")}
    metrics = json.loads(get(bucket, "runs/e2e/best/metrics.json"))
    scored = {row["class"]: row for row in metrics["per_class"] if row["support"] > 0}
    assert set(scored) == set(CLASSES) and all(0 <= row["f1"] <= 1 for row in scored.values())
    assert {row["support"] for row in scored.values()} == {12}
    rows = list(csv.DictReader(io.StringIO(get(bucket, "runs/e2e/best/per_class.csv").decode())))
    assert {r["class"] for r in rows if r["support"] != "0"} == set(CLASSES)
    assert metrics["accuracy"] == report["accuracy"]
    # Ray's checkpoints and the TensorBoard logs are in S3 too; no object carries the credentials.
    assert any(k.startswith("checkpoint_") and k.endswith("/checkpoint.pt") for k in run)
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in run)
    assert not any(SECRET.encode() in get(bucket, f"runs/e2e/{k}") for k in run)

    # (A rerun with the same name resumes from the checkpoints in S3: tests/system/test_fault_tolerance.py.)

    # A second prepare with the same inputs uploads nothing new.
    before = {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket, "simpsons/").items()}
    assert prepare_dataset(**prepare).files_sent == 0
    assert {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket, "simpsons/").items()} == before
