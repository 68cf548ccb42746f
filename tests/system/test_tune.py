"""Ray Tune sweeps: a real sweep on the local Ray cluster into the loopback S3 server (ASHA stops
the trial with a hopeless learning rate), tracked in a real `mlflow server` (a parent run, a child
run per trial), and a sweep whose driver is killed part-way and resumed without re-running its
finished trial."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from mlflow_server import BEST_ARTIFACTS, MlflowServer, runs_tagged, score_steps
from ray_head import REPO, popen_group

from simpsons.config import load_sweep
from simpsons.tracking import SWEEP_TAG, TRIAL_STATUS_TAG

EPOCHS = 2

# Small, quick trials on the test-written images: 2 workers x 0.5 CPU + 1 CPU for the trial's
# driver = 2 logical CPUs, so two trials share the 4-CPU test cluster at a time.
BASE = [
    f"optim.epochs={EPOCHS}",
    "optim.warmup_epochs=0",
    "optim.batch_size=32",
    "data.stored_size=40",
    "data.train_size=32",
    "train.workers=2",
    "train.cpus_per_worker=0.5",
    "train.use_gpu=false",
    "train.histogram_every=0",
]


# ---------------------------------------------------------------------------------------------
# Config (no Ray)


# ---------------------------------------------------------------------------------------------
# Real sweeps


def _bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _read(bucket: str, key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(bucket: str, prefix: str) -> set[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def mlflow_server(s3_server, tmp_path):
    (tmp_path / "mlflow").mkdir()
    with MlflowServer(tmp_path / "mlflow", f"s3://{_bucket('mlartifacts')}/sweeps", s3_server) as server:
        yield server


@pytest.mark.timeout(480)  # a hang guard: ~130-220 s on a busy 2-core machine
def test_sweep_stops_a_hopeless_trial_exports_the_best_and_tracks_a_run_per_trial(
    ray_cluster, s3_server, packed_dataset, mlflow_server
):
    import torch

    from simpsons.tune import run_sweep

    bucket = _bucket("sweeps")
    # Grid order is trial order. Two sane learning rates run first (2 at a time); the hopeless
    # one (AdamW at lr 5) only starts when one of them has finished, so it always meets a better
    # score at ASHA's rung (epoch 1) and is stopped there. With reduction factor 2 the cutoff at a
    # rung is the median of the scores already there, so the sane trial that reaches epoch 1
    # second is also stopped when it scores below the first: which one depends on timing.
    cfg = load_sweep(
        None,
        BASE
        + [
            f"run.storage=s3://{bucket}/simpsons",
            f"run.tracking_uri={mlflow_server.uri}",
            "tune.name=asha",
            "tune.num_samples=1",
            "tune.max_concurrent_trials=2",
            "tune.grace_period=1",
            "tune.reduction_factor=2",
            "tune.space={optim.lr: {grid: [1.0e-3, 3.0e-3, 5.0]}, loss.gamma: {uniform: [0.5, 2.0]}, "
            "loss.alpha: {choice: [auto, 1.0]}}",
        ],
    )
    rows = run_sweep(cfg, str(packed_dataset))

    by_lr = {row["optim.lr"]: row for row in rows}
    assert sorted(by_lr) == [1e-3, 3e-3, 5.0]
    assert by_lr[5.0]["status"] == "stopped early" and by_lr[5.0]["epochs_run"] == 1
    sane = [by_lr[lr] for lr in (1e-3, 3e-3)]
    assert any(row["status"] == "completed" and row["epochs_run"] == EPOCHS for row in sane)
    assert all(
        row["status"] == "completed" or (row["status"] == "stopped early" and row["epochs_run"] == 1) for row in sane
    )

    prefix = "simpsons/asha/"
    keys = _keys(bucket, prefix)
    for name in ("checkpoint.pt", "metrics.json", "per_class.csv", "confusion.png", "config.yaml"):
        assert f"{prefix}best/{name}" in keys
    assert {f"{prefix}trials.csv", f"{prefix}trials.png", f"{prefix}sweep.yaml"} <= keys

    table = list(csv.DictReader(io.StringIO(_read(bucket, f"{prefix}trials.csv").decode())))
    assert len(table) == 3
    best_row = max(table, key=lambda r: float(r["best_val_macro_f1"]))
    assert best_row is table[0]
    assert float(best_row["optim.lr"]) != 5.0
    metrics = json.loads(_read(bucket, f"{prefix}best/metrics.json"))
    assert metrics["macro_f1"] == pytest.approx(float(best_row["best_val_macro_f1"]), abs=1e-12)
    assert metrics["epoch"] + 1 == int(best_row["best_epoch"])
    assert metrics["macro_f1"] > 0.5  # the sane trials learn the colours and shapes
    best_cfg = yaml.safe_load(_read(bucket, f"{prefix}best/config.yaml"))
    assert best_cfg["optim"]["lr"] == pytest.approx(float(best_row["optim.lr"]))
    assert best_cfg["loss"]["gamma"] == pytest.approx(float(best_row["loss.gamma"]))
    assert str(best_cfg["loss"]["alpha"]) == best_row["loss.alpha"]
    checkpoint = torch.load(io.BytesIO(_read(bucket, f"{prefix}best/checkpoint.pt")), weights_only=True)
    assert checkpoint["epoch"] + 1 == int(best_row["best_epoch"])
    assert checkpoint["config"]["optim"]["lr"] == pytest.approx(float(best_row["optim.lr"]))
    # The best model's config is a run's (training sections); the sweep's own sweep.yaml keeps tune: too.
    assert "tune" not in best_cfg and "tune" not in checkpoint["config"]
    assert "space" in yaml.safe_load(_read(bucket, f"{prefix}sweep.yaml"))["tune"]

    # In MLflow: one parent run for the sweep, one child run per trial carrying the scheduler's
    # decision that trials.csv records.
    client = mlflow_server.client()
    parents = runs_tagged(client, "asha", SWEEP_TAG, f"s3://{bucket}/simpsons/asha")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    parent = parents[0]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(float(child.data.params["optim.lr"]) for child in children) == [1e-3, 3e-3, 5.0]
    rows = {row["trial_id"]: row for row in table}
    for child in children:
        row = rows[child.info.run_name.removeprefix("asha-")]
        assert child.data.tags[TRIAL_STATUS_TAG] == row["status"] in ("completed", "stopped early")
        assert child.data.tags["simpsons.epochs_run"] == row["epochs_run"]
        # Each epoch logged once, in order. ASHA's stop reaches the workers asynchronously: an epoch
        # that finished before it did was trained and is logged, beyond what Tune counted.
        steps = score_steps(client, child.info.run_id)
        assert steps == list(range(len(steps))) and int(row["epochs_run"]) <= len(steps) <= EPOCHS, (steps, row)
        assert child.info.status == "FINISHED"
    assert parent.data.params["tune.name"] == "asha"
    assert parent.data.tags["simpsons.best_trial"] == table[0]["trial_id"]  # trials.csv: best first
    assert {"trials.csv", "trials.png", "best"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "best")} == BEST_ARTIFACTS


class _Driver:
    """`python jobs/tune.py` in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], env: dict):
        self.lines: list[str] = []
        self.proc = popen_group(
            [sys.executable, str(REPO / "jobs" / "tune.py"), *args], env, REPO, subprocess.PIPE, None, text=True
        )
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True
        )
        self.reader.start()

    def started_trials(self) -> list[str]:  # from simpsons.tune.ProgressCallback's lines
        return [line.split()[1] for line in self.lines if line.startswith("trial ") and " started:" in line]

    def finished_trials(self) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith("trial ") and " after " in line]

    def output(self) -> str:
        return "".join(self.lines[-80:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)


@pytest.mark.timeout(480)  # a hang guard
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, s3_server, packed_dataset, tmp_path):
    from ray import tune

    from simpsons.storage import pyarrow_filesystem

    bucket = _bucket("resume")
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"uri": str(packed_dataset)},
                "run": {"storage": f"s3://{bucket}/simpsons"},
                "tune": {
                    "name": "killed",
                    "num_samples": 1,
                    "max_concurrent_trials": 1,
                    "scheduler": "fifo",
                    "space": {"optim.lr": {"grid": [2e-3, 3e-3]}},
                },
            }
        )
    )
    # Six epochs, so the second trial is still midway when the driver is killed: the kill waits for
    # Tune's saved state to record the first trial's end, during which a 3-epoch trial could finish.
    epochs = 6
    args = ["--config", str(config), *[a for item in [*BASE, f"optim.epochs={epochs}"] for a in ("--set", item)]]
    # The driver joins the test's cluster as its own job, like `ray job submit` would start it.
    # Tune saves its state every 10 s or more; every second here, so the first trial's end is on
    # record long before the second trial (which takes longer than that to start) is killed.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    fs, root = pyarrow_filesystem(f"s3://{bucket}/simpsons")

    def has_checkpoint(trial_id: str) -> bool:  # what a restarted Train run resumes from
        return "checkpoint_manager_snapshot.json" in {
            key.rsplit("/", 1)[-1] for key in _keys(bucket, f"simpsons/killed/runs/killed-{trial_id}/")
        }

    def saved_statuses() -> dict[str, str]:  # what Tuner.restore will see; {} until Tune first saves
        try:
            return {
                t.trial_id: t.status for t in tune.ExperimentAnalysis(f"{root}/killed", storage_filesystem=fs).trials
            }
        except (ValueError, OSError):
            return {}

    first = _Driver(args, env)
    try:
        # Kill the driver as soon as the trial after the finished one has saved a checkpoint and
        # the experiment state in storage records the finished one (the driver prints a trial's end
        # before Tune's next save of its state, which a kill right then would lose).
        deadline = time.monotonic() + 180
        interrupted = None
        while interrupted is None and time.monotonic() < deadline and first.proc.poll() is None:
            time.sleep(0.5)
            if first.finished_trials():
                running = [tid for tid in first.started_trials() if tid not in first.finished_trials()]
                midway = next((tid for tid in running if has_checkpoint(tid)), None)
                if midway and "TERMINATED" in saved_statuses().values():
                    interrupted = midway
        assert interrupted, f"the sweep was not caught with one trial finished and one midway:\n{first.output()}"
    finally:
        first.kill()
    saved = saved_statuses()
    finished = [tid for tid, status in saved.items() if status == "TERMINATED"]
    assert finished and interrupted not in finished, saved
    finished_runs = {tid: _keys(bucket, f"simpsons/killed/runs/killed-{tid}/") for tid in finished}

    second = _Driver([*args, "--resume"], env)
    try:
        assert second.proc.wait(timeout=180) == 0, second.output()
    finally:
        second.kill()
    resumed = second.started_trials()
    assert interrupted in resumed, second.output()
    assert not set(resumed) & set(finished), f"finished trials {finished} ran again: {resumed}"
    for tid, keys in finished_runs.items():  # nothing new was written by a finished trial's run
        assert _keys(bucket, f"simpsons/killed/runs/killed-{tid}/") == keys
    # The interrupted trial went on from its checkpoint instead of starting over.
    history = tune.ExperimentAnalysis(f"{root}/killed", storage_filesystem=fs).trial_dataframes[interrupted]
    assert bool(history["resumed"].iloc[-1]) and int(history["epoch"].iloc[-1]) == epochs - 1, (
        f"{history[['epoch', 'resumed']]}\n{second.output()}"
    )

    table = list(csv.DictReader(io.StringIO(_read(bucket, "simpsons/killed/trials.csv").decode())))
    assert len(table) == 2 and {r["status"] for r in table} == {"completed"}
    assert {r["epochs_run"] for r in table} == {str(epochs)}
    assert {r["trial_id"] for r in table} == set(finished) | set(resumed)
    assert "simpsons/killed/best/metrics.json" in _keys(bucket, "simpsons/killed/best/")
