"""MLflow tracking against a real `mlflow server` on 127.0.0.1: a SQLite backend store and artifacts
in the loopback S3 server (moto), read back through MLflow's own client.

1. Refused before Ray starts, in one sentence with exit 2: an unreachable tracking URI, and a
   tracking URI without the mlflow package (its import blocked in the job's process).
2. A 2-worker run on a real Ray head (tests/ray_head.py) is one FINISHED MLflow run whose params are
   best/config.yaml flattened and whose val macro-F1 history is metrics.json's; best/ is its artifacts.
3. The driver killed after epoch 1 and the same command run again: still one run, each epoch once.
4. The server unreachable for two epochs mid-run, then back: no epoch lost, none twice, said once.
5. A smoke sweep: one parent run, one child run per trial with the scheduler's decision as a tag.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from ray_head import REPO, SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, popen_group, sets
from run_history import wait_for_checkpoint
from tcp_gate import TcpGate

from simpsons.cluster import free_port
from simpsons.tracking import RUN_TAG, SCORE, SWEEP_TAG, TRIAL_STATUS_TAG

BUCKET = "tracking"
BEST_ARTIFACTS = {"metrics.json", "per_class.csv", "confusion.png", "curves.png", "config.yaml", "model.pt2"}


class MlflowServer:
    """`mlflow server` with a SQLite store and S3 artifacts, in a process group of its own; it can be
    stopped and started again on the same port and database (an outage)."""

    def __init__(self, workdir: Path, artifacts: str, s3_endpoint: str, *extra: str, **env: str):
        self.workdir, self.artifacts, self.extra = workdir, artifacts, extra
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        # The server writes artifacts to S3 with boto3: the test's keys and the moto endpoint.
        self.env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **env}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            *self.extra,
        ]
        log = open(self.workdir / "server.log", "a")
        self.process = popen_group(cmd, self.env, self.workdir, log, signal.SIGTERM)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            assert self.process.poll() is None, f"mlflow server exited: {self.log_tail()}"
            assert time.monotonic() < deadline, f"mlflow server did not answer in {timeout:.0f} s: {self.log_tail()}"
            time.sleep(0.5)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log_tail(self) -> str:
        return (self.workdir / "server.log").read_text()[-3000:]

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), f"s3://{BUCKET}/mlartifacts", s3_server)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def head(s3_server):
    with RayHead(num_cpus=4) as head:
        yield head


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def train_command(packed_dataset, run_name: str, epochs: int, *extra: str) -> list[str]:
    overrides = {
        **TINY_RUN,
        "data.uri": packed_dataset,
        "optim.epochs": epochs,
        "optim.warmup_epochs": 0,
        "train.workers": 2,
        "run.storage": f"s3://{BUCKET}/runs",
        "run.name": run_name,
    }
    return [str(VENV_BIN / "python"), *SMOKE_TRAIN, *sets(overrides), *extra]


def runs_tagged(client, experiment: str, tag: str, value: str) -> list:
    from mlflow.entities import ViewType

    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id], f"tags.`{tag}` = '{value}'", run_view_type=ViewType.ALL)


def score_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, SCORE))


def s3_json(key: str):
    return json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())


def wait_for_epoch(client, experiment: str, tag_value: str, epoch: int, process, timeout: float = 240) -> str:
    """The MLflow run's id once it has epoch `epoch`'s figures."""
    deadline = time.monotonic() + timeout
    while True:
        experiment_found = client.get_experiment_by_name(experiment)
        if experiment_found is not None:
            runs = runs_tagged(client, experiment, RUN_TAG, tag_value)
            if runs and epoch in score_steps(client, runs[0].info.run_id):
                return runs[0].info.run_id
        assert process.popen.poll() is None, (
            f"the run ended before epoch {epoch} was in MLflow: {process.output[-4000:]}"
        )
        assert time.monotonic() < deadline, (
            f"epoch {epoch} not in MLflow after {timeout:.0f} s: {process.output[-4000:]}"
        )
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------
# Refused before Ray starts


def _job(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_tracking_uri_is_refused_before_ray_in_one_sentence(packed_dataset, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = _job(
        [sys.executable, *SMOKE_TRAIN, *sets({"data.uri": packed_dataset, "run.storage": tmp_path / "runs"})],
        _env(MLFLOW_TRACKING_URI=uri),  # the environment's URI counts when the config leaves it empty
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: No MLflow tracking server answers at run.tracking_uri={uri} (Connection refused); start it "
        "(see docs/tracking.md), fix the URI, or set run.tracking_uri empty to train without tracking."
    ], done.stderr
    assert "Ray" not in done.stdout + done.stderr and time.monotonic() - started < 60


def test_a_tracking_uri_without_mlflow_installed_is_refused_in_one_sentence(packed_dataset, tmp_path):
    # The job's own process, with `import mlflow` failing as it does where the package is missing.
    blocked = (
        "import runpy, sys; sys.modules['mlflow'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    args = sets(
        {"data.uri": packed_dataset, "run.storage": tmp_path / "runs", "run.tracking_uri": "http://mlflow:5000"}
    )
    done = _job([sys.executable, "-c", blocked, *SMOKE_TRAIN, *args], _env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: run.tracking_uri is http://mlflow:5000, but the mlflow package is not installed; "
        "pip install -e '.[mlflow]' (or pip install mlflow-skinny), or set run.tracking_uri empty to train "
        "without tracking."
    ], done.stderr


def test_an_experiment_the_user_may_not_write_to_is_refused_before_ray_in_one_sentence(
    s3_server, packed_dataset, tmp_path
):
    import requests

    # MLflow's basic-auth app: every user may read every experiment (default_permission READ), not write.
    admin = ("admin", uuid.uuid4().hex + "A1!")
    auth_config = tmp_path / "basic_auth.ini"
    auth_config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = {admin[0]}\nadmin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server = MlflowServer(
        tmp_path,
        f"s3://{BUCKET}/auth",
        s3_server,
        "--app-name",
        "basic-auth",
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config),
        MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        server.start()
        user = ("reader", uuid.uuid4().hex + "B2?")
        api = f"{server.uri}/api/2.0/mlflow"
        for path, body in (
            ("users/create", {"username": user[0], "password": user[1]}),
            ("experiments/create", {"name": "team"}),
        ):
            response = requests.post(f"{api}/{path}", json=body, auth=admin, timeout=30)
            assert response.ok, response.text
        args = sets({"data.uri": packed_dataset, "run.storage": tmp_path / "runs", "run.experiment": "team"})
        creds = {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}
        done = _job([sys.executable, *SMOKE_TRAIN, *args], _env(MLFLOW_TRACKING_URI=server.uri, **creds))
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: The MLflow server at {server.uri} refuses this user write access to experiment 'team' "
            "(HTTP 403); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, ask for "
            "EDIT permission on it, or set run.experiment to one you may write to."
        ], done.stderr + server.log_tail()
        assert "Ray" not in done.stdout + done.stderr and user[1] not in done.stdout + done.stderr
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Training runs (a real Ray head, storage in S3)


def _flat(config: dict) -> dict[str, str]:
    """best/config.yaml as the params the issue asks for: `section.key`, strings as they are, the rest JSON."""
    return {
        f"{section}.{key}": value if isinstance(value, str) else json.dumps(value)
        for section, values in config.items()
        for key, value in values.items()
    }


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_is_one_finished_mlflow_run_with_its_config_history_and_best(head, mlflow_server, packed_dataset):
    name = f"tracked-{uuid.uuid4().hex[:6]}"
    driver = head.spawn(
        train_command(packed_dataset, name, 3), {**head.driver_env(), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    )
    assert driver.wait(timeout=300) == 0, driver.output[-6000:]

    client = mlflow_server.client()
    runs = runs_tagged(client, name, RUN_TAG, f"s3://{BUCKET}/runs/{name}")  # run.experiment defaults to run.name
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == name

    config = yaml.safe_load(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{name}/best/config.yaml")["Body"].read()
    )
    assert config["run"]["tracking_uri"] == mlflow_server.uri and config["run"]["experiment"] == name
    assert run.data.params == _flat(config)

    metrics = s3_json(f"runs/{name}/best/metrics.json")
    history = client.get_metric_history(run.info.run_id, SCORE)
    assert sorted((m.step, m.value) for m in history) == [(h["epoch"], h[SCORE]) for h in metrics["history"]]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]

    tags = run.data.tags
    provenance = metrics["provenance"]
    assert tags["simpsons.dataset_uri"] == provenance["dataset_uri"] == str(packed_dataset)
    assert tags["simpsons.manifest_sha256"] == provenance["manifest_sha256"]
    assert tags["simpsons.code_version"] == provenance["code_version"]
    assert (tags["simpsons.world_size"], tags["simpsons.device"], tags["simpsons.precision"]) == ("2", "cpu", "bf16")
    assert tags["simpsons.best_uri"] == f"s3://{BUCKET}/runs/{name}/best"

    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "best")} == BEST_ARTIFACTS
    # The server proxies them into the S3 bucket (--artifacts-destination).
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/")
    stored = {item["Key"] for item in listed.get("Contents", []) if run.info.run_id in item["Key"]}
    assert {key.rsplit("/", 1)[-1] for key in stored} == BEST_ARTIFACTS
    checkpoint = io.BytesIO(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{name}/best/checkpoint.pt")["Body"].read()
    )
    import torch

    assert torch.load(checkpoint, weights_only=True)["tracking_run"] == run.info.run_id


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_a_killed_driver_rerun_continues_the_same_mlflow_run_and_logs_each_epoch_once(
    head, mlflow_server, packed_dataset
):
    name, epochs = f"killed-{uuid.uuid4().hex[:6]}", 8
    command = train_command(packed_dataset, name, epochs, "--set", f"run.tracking_uri={mlflow_server.uri}")
    client = mlflow_server.client()
    first = head.spawn(command, head.driver_env())
    run_id = wait_for_epoch(client, name, f"s3://{BUCKET}/runs/{name}", 1, first)
    wait_for_checkpoint(BUCKET, f"runs/{name}", 1, first)  # what the second driver resumes from
    first.kill()  # SIGKILL: the MLflow run is left RUNNING, as when a job's process or node dies
    assert client.get_run(run_id).info.status == "RUNNING"

    second = head.spawn(command, head.driver_env())
    assert second.wait(timeout=300) == 0, second.output[-6000:]
    assert f"MLflow: continuing run {run_id}" in second.output
    runs = runs_tagged(client, name, RUN_TAG, f"s3://{BUCKET}/runs/{name}")
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert score_steps(client, run_id) == list(range(epochs)), "every epoch once"
    history = s3_json(f"runs/{name}/best/metrics.json")["history"]
    assert any(h["resumed"] for h in history), "the second driver resumed from a checkpoint"


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_a_tracking_server_outage_mid_run_loses_no_epoch(head, mlflow_server, packed_dataset):
    # The job reaches the server through a gate that the test shuts (connections refused, open ones
    # cut) for as long as two epochs train, then opens: the outage ends well before the run does on
    # a fast machine too, which a server restart (10-40 s) did not promise.
    name, epochs = f"outage-{uuid.uuid4().hex[:6]}", 60
    client = mlflow_server.client()
    with TcpGate(mlflow_server.port) as gate:
        command = train_command(packed_dataset, name, epochs, "--set", f"run.tracking_uri={gate.uri}")
        driver = head.spawn(command, head.driver_env())
        run_id = wait_for_epoch(client, name, f"s3://{BUCKET}/runs/{name}", 0, driver)
        gate.shut()
        try:
            driver.wait_for_line(f"MLflow at {gate.uri} does not answer", timeout=120)
            last = max(trained_epochs(driver, epochs), default=0)
            driver.wait_for_line(f"epoch {last + 2}/{epochs} train loss", timeout=120)
        finally:
            gate.open()
        assert max(trained_epochs(driver, epochs)) < epochs, "the run ended during the outage"
        driver.wait_for_line(f"MLflow at {gate.uri} answers again", timeout=120)
        # Still training once the server is back: what it missed is caught up by rank 0, not the driver.
        assert driver.wait(timeout=300) == 0, driver.output[-6000:]
    said = [line for line in driver.lines if "MLflow" in line]
    assert sum(f"MLflow at {gate.uri} does not answer" in line for line in said) == 1, said
    assert score_steps(client, run_id) == list(range(epochs)), "every epoch once"
    assert client.get_run(run_id).info.status == "FINISHED"


def trained_epochs(driver, epochs: int) -> list[int]:
    """The epochs the driver has reported trained so far (1-based)."""
    return [int(m.group(1)) for m in re.finditer(rf"epoch (\d+)/{epochs} train loss", "\n".join(driver.lines))]


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_a_sweep_is_a_parent_run_with_one_child_per_trial_and_the_scheduler_decision(
    head, mlflow_server, packed_dataset
):
    sweep = f"sweep-{uuid.uuid4().hex[:6]}"
    overrides = {
        **TINY_RUN,
        "data.uri": packed_dataset,
        "optim.epochs": 2,
        "optim.warmup_epochs": 0,
        "train.workers": 2,
        "train.cpus_per_worker": 0.5,
        "run.storage": f"s3://{BUCKET}/sweeps",
        "run.tracking_uri": mlflow_server.uri,
        "tune.name": sweep,
        "tune.num_samples": 1,
        "tune.max_concurrent_trials": 1,
        "tune.grace_period": 1,
        "tune.reduction_factor": 2,
        "tune.space": "{optim.lr: {grid: [1.0e-3, 5.0]}}",
    }
    driver = head.spawn([str(VENV_BIN / "python"), "jobs/tune.py", *sets(overrides)], head.driver_env())
    assert driver.wait(timeout=420) == 0, driver.output[-6000:]

    client = mlflow_server.client()
    parents = runs_tagged(client, sweep, SWEEP_TAG, f"s3://{BUCKET}/sweeps/{sweep}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    parent = parents[0]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_lr = {float(child.data.params["optim.lr"]): child for child in children}
    assert sorted(by_lr) == [1e-3, 5.0], [c.data.params.get("optim.lr") for c in children]
    # Each child carries the scheduler's decision the sweep's own trials.csv records.
    table = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"sweeps/{sweep}/trials.csv")["Body"].read().decode()
    rows = {row["trial_id"]: row for row in csv.DictReader(io.StringIO(table))}
    for child in children:
        row = rows[child.info.run_name.removeprefix(f"{sweep}-")]
        assert child.data.tags[TRIAL_STATUS_TAG] == row["status"] in ("completed", "stopped early")
        assert child.data.tags["simpsons.epochs_run"] == row["epochs_run"]
        # Each epoch logged once, in order. ASHA's stop reaches the workers asynchronously: an epoch
        # that finished before it did was trained and is logged, beyond what Tune counted.
        steps = score_steps(client, child.info.run_id)
        assert steps == list(range(len(steps))) and int(row["epochs_run"]) <= len(steps) <= 2, (steps, row)
        assert child.info.status == "FINISHED"
    assert parent.data.params["tune.name"] == sweep
    assert parent.data.tags["simpsons.best_trial"] == next(iter(rows))  # trials.csv: best first
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.png", "best"} <= top
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "best")} == BEST_ARTIFACTS
