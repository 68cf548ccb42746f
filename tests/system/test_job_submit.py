"""`ray job submit --working-dir . -- python jobs/train.py ...` against a real Ray head, as on a cluster.

The head is started by `ray start --head` on 127.0.0.1 with token authentication on (tests/ray_head.py);
the job trains 2 CPU workers on images written by the test, with its run storage in S3 on the
loopback moto server; the test then finds the best/ outputs in the bucket with boto3.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import boto3
import pytest
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, job_submit, sets

from simpsons.report import OUTPUT_FILES

RAY = str(VENV_BIN / "ray")


@pytest.fixture(scope="module")
def head(s3_server):
    with RayHead(num_cpus=4) as head:
        yield head


def test_submitted_job_trains_and_writes_best_to_s3(head, packed_dataset):
    bucket, prefix, run_name = "cluster-jobs", "simpsons/runs", "submitted"
    s3 = boto3.client("s3")  # reaches the loopback server through AWS_ENDPOINT_URL
    s3.create_bucket(Bucket=bucket)
    job_id = "simpsons-submit-test"
    # Token authentication is on: the job API refuses a request that carries no token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    # The command a user runs, from the repo root: a relative config path plus overrides that
    # point at the test's packed images and keep the run small.
    overrides = {
        **TINY_RUN,
        "data.uri": packed_dataset,
        "optim.epochs": 2,
        "train.workers": 2,
        "run.storage": f"s3://{bucket}/{prefix}",
        "run.name": run_name,
    }
    submit = head.run(
        job_submit(job_id, *SMOKE_TRAIN, *sets(overrides)),
        env=head.job_client_env(),
        timeout=300,
    )
    submitted = submit.stdout + submit.stderr
    assert submit.returncode == 0, submitted[-6000:]
    # `ray job submit` ends by asking the server for the job's final status.
    assert f"Job '{job_id}' succeeded" in submitted, submitted[-6000:]

    # The working dir the job ran in (unpacked on this "node"): .gitignore/.rayignore kept the
    # virtualenv, runs, data and caches out of it.
    unpacked = [
        path
        for path in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
        if path.is_dir()
    ]
    assert len(unpacked) == 1, unpacked
    assert (unpacked[0] / "jobs" / "train.py").is_file() and (unpacked[0] / "configs" / "smoke.yaml").is_file()
    assert not {".venv", ".git", "runs", "data", "cache"} & {p.name for p in unpacked[0].iterdir()}
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < 5e6, f"the uploaded working dir holds {size / 1e6:.1f} MB"

    # Progress and metrics are in `ray job logs`: both epochs' summaries and the export line.
    logs = head.run([RAY, "job", "logs", job_id], env=head.job_client_env(), timeout=60).stdout
    assert "epoch 1/2 train loss" in logs and "epoch 2/2 train loss" in logs, logs[-4000:]
    assert f"-> s3://{bucket}/{prefix}/{run_name}/best" in logs, logs[-4000:]
    # Neither the cluster token nor the S3 secret key shows up in what the user sees.
    for secret in (head.token_path.read_text(), os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in submitted and secret not in logs

    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{run_name}/best/")
    names = {item["Key"].rsplit("/", 1)[-1]: item["Size"] for item in listed.get("Contents", [])}
    assert set(OUTPUT_FILES) <= set(names), sorted(names)
    assert all(names[name] > 0 for name in OUTPUT_FILES)


def test_a_relative_run_storage_is_refused_under_a_working_dir_and_nothing_is_written(head, packed_dataset):
    """The driver runs in Ray's unpacked copy of the working dir: `./runs-wd` would put checkpoints
    in Ray's package cache (deleted later), not in the submitter's ./runs-wd."""
    overrides = {**TINY_RUN, "data.uri": packed_dataset, "run.storage": "./runs-wd", "run.name": "wd"}
    done = head.run(job_submit("relative-storage", *SMOKE_TRAIN, *sets(overrides)), head.job_client_env(), 240)
    assert done.returncode != 0, done.stdout[-3000:]
    logs = head.run([RAY, "job", "logs", "relative-storage"], env=head.job_client_env(), timeout=60).stdout
    errors = {line for line in logs.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and "run.storage ./runs-wd is relative, but this job runs in the copy" in errors.pop()
    assert not list(head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/*/runs-wd"))
