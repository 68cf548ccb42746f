"""Careless and hostile input to every job: exit 2, one sentence naming the thing and the fix, no
traceback, nothing written, and no Ray started.

Each case runs the real job as a subprocess against real files written here and the real S3
server on loopback; the only thing wrong in each is the input named by the case.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from synthetic import make_image_tree

from simpsons.cluster import free_port
from simpsons.model import create_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(s3_server, tmp_path_factory) -> dict:
    """Real files: a good image tree, an empty bucket, and files that are not checkpoints."""
    root = tmp_path_factory.mktemp("bad_input")
    files = {"src": make_image_tree(root / "src", per_split={"train": 2, "val": 1}, size=24), "root": root}
    files["bucket"] = f"bad-input-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=files["bucket"])
    (root / "random.pt").write_bytes(
        random.Random(0).randbytes(4096)
    )  # torch.load fails on these with varying error types
    torch.save(create_model(42).state_dict(), root / "state_dict.pt")  # weights alone: no config, no class list
    torch.save({"model": {}, "config": {}, "class_names": ["a", "b"], "format": 99}, root / "future.pt")
    (root / "a_file").write_text("not a folder")
    return files


# (job, arguments, the expected message after "error: "): {src}, {root}, {bucket}, {closed} are filled in.
_DEAD_RAY = (
    "No Ray cluster answers at RAY_ADDRESS=127.0.0.1:1 (Connection refused); start it (ray start --head) "
    "or unset RAY_ADDRESS to run on a local Ray instance."
)
CASES = {
    # Every input is good; the RAY_ADDRESS every case runs with names no cluster (ray.init waited minutes on it).
    "no Ray cluster at RAY_ADDRESS": ("train", [], _DEAD_RAY),
    "no Ray cluster at RAY_ADDRESS for a sweep": ("tune", [], _DEAD_RAY),
    # Within the config's bounds but refused by the loss or the schedule: refused before Ray by
    # driver.check_recipe (workers used to fail after ~48 s with a traceback, exit 1).
    "label smoothing of 1": (
        "train",
        ["--set", "loss.label_smoothing=1"],
        "The config's model, loss or optimizer cannot be built (loss.label_smoothing must be in [0, 1), not 1.0: "
        "1 would leave no target); change that value.",
    ),
    "plateau factor of 1": (
        "train",
        ["--set", "optim.schedule=plateau", "--set", "optim.plateau_factor=1"],
        "The learning-rate schedule optim.schedule=plateau refuses these optim.* values (Factor should be < 1.0); "
        "change optim.plateau_factor or optim.plateau_patience.",
    ),
    # One value out of bounds and one of the wrong type, as the job reports them; every other bound
    # is checked in process (unit/test_config.py), where a case costs no interpreter start.
    "zero epochs": (
        "train",
        ["--set", "optim.epochs=0"],
        "optim.epochs must be at least 1, not 0; set it with --set optim.epochs=<value>.",
    ),
    "wrong type": (
        "train",
        ["--set", "optim.epochs=ten"],
        "Config key 'optim.epochs' must be of type int, not str ('ten').",
    ),
    "missing config file": (
        "train",
        ["--config", "{root}/nope.yaml"],
        "Config file {root}/nope.yaml does not exist; pass one of the files in configs/.",
    ),
    "run storage bucket missing": (
        "train",
        ["--set", "run.storage=s3://no-such-bucket-here/runs"],
        "Bucket 'no-such-bucket-here' does not exist at {endpoint}; create it (aws s3 mb "
        "s3://no-such-bucket-here) or fix the URI s3://no-such-bucket-here/runs.",
    ),
    "run storage endpoint unreachable": (
        "train",
        ["--set", "run.storage=s3://{bucket}/runs", "--set", "run.s3_endpoint={closed}"],
        "Cannot reach the S3 endpoint {closed} for s3://{bucket}/runs; check AWS_ENDPOINT_URL "
        "or run.s3_endpoint (scheme, host and port) and that the server is running.",
    ),
    "run storage is a file": (
        "train",
        ["--set", "run.storage={root}/a_file"],
        "Cannot write to the run storage folder {root}/a_file (File exists); fix its permissions or "
        "point run.storage elsewhere.",
    ),
    "training source missing": (
        "train",
        ["--data", "{root}/nowhere"],
        "Data source {root}/nowhere does not exist; pass an existing folder or archive, an http(s) URL "
        "or a Google Drive link.",
    ),
    "sweep storage bucket missing": (
        "tune",
        ["--set", "run.storage=s3://no-such-bucket-here/sweeps"],
        "Bucket 'no-such-bucket-here' does not exist at {endpoint}; create it (aws s3 mb "
        "s3://no-such-bucket-here) or fix the URI s3://no-such-bucket-here/sweeps.",
    ),
    "validation fraction above 1": (
        "prepare_data",
        ["--dest", "s3://{bucket}/p", "--val-fraction", "1.5"],
        "The validation fraction 1.5 must be more than 0 and less than 1; pass e.g. --val-fraction 0.15.",
    ),
    "missing source": (
        "prepare_data",
        ["--dest", "s3://{bucket}/p", "--source", "{root}/nowhere"],
        "Data source {root}/nowhere does not exist; pass an existing folder or archive, an http(s) URL or a "
        "Google Drive link.",
    ),
    "checkpoint of random bytes": (
        "evaluate",
        ["--checkpoint", "{root}/random.pt"],
        "{root}/random.pt is not a checkpoint of this project (torch cannot read it); "
        "pass a run's best/ folder or the checkpoint.pt in it.",
    ),
    "plain state dict": (
        "evaluate",
        ["--checkpoint", "{root}/state_dict.pt"],
        "{root}/state_dict.pt is a PyTorch file but not a checkpoint of this project (it has no model, config, "
        "class_names); pass a run's best/ folder or the checkpoint.pt in it.",
    ),
    "checkpoint of another format version": (
        "predict",
        ["--checkpoint", "{root}/future.pt"],
        "{root}/future.pt is a checkpoint of format version 99 and this code reads "
        "version 1; use the code version that wrote it.",
    ),
}


def _command(job: str, args: list[str], inputs: dict) -> list[str]:
    root = inputs["root"]
    training = [
        "--data",
        str(inputs["src"]),
        "--set",
        f"data.cache_dir={root}/cache",
        "--set",
        f"run.storage={root}/runs",
    ]
    common = {
        "train": training,
        "tune": training,
        "prepare_data": ["--source", str(inputs["src"]), "--set", f"data.cache_dir={root}/cache"],
        "evaluate": ["--data", str(inputs["src"]), "--out", f"{root}/eval"],
        "predict": [str(next((inputs["src"] / "dataset/val/bart_simpson").iterdir()))],
    }[job]
    return [sys.executable, f"jobs/{job}.py", *common, *args]  # later options win over the common ones


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_sentence_exit_2_and_nothing_is_written(case, inputs, s3_server):
    job, args, expected = CASES[case]
    fill = {
        "root": inputs["root"],
        "bucket": inputs["bucket"],
        "endpoint": s3_server,
        "closed": f"http://127.0.0.1:{free_port()}",
    }
    args = [a.format(**fill) for a in args]
    expected = expected.format(**fill)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # a job that tried to start or join Ray says so (first cases)
    done = subprocess.run(_command(job, args, inputs), cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {expected}"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    root = inputs["root"]
    assert not (root / "runs").exists() and not (root / "cache").exists() and not (root / "eval").exists()
    assert not boto3.client("s3").list_objects_v2(Bucket=inputs["bucket"]).get("Contents")
