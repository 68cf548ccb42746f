"""MLflow tracking against a real `mlflow server` on 127.0.0.1: a SQLite backend store and artifacts
in the loopback S3 server (moto), read back through MLflow's own client.

(The refusals before Ray starts are in tests/integration/test_tracking_checks.py.)

1. A 2-worker run on a real Ray head (tests/ray_head.py), its driver killed after epoch 1 and the
   same command run again, is one FINISHED MLflow run, each epoch once, whose params are
   best/config.yaml flattened and whose val macro-F1 history is metrics.json's; best/ is its artifacts.
2. The server unreachable for two epochs mid-run, then back: no epoch lost, none twice, said once.

A sweep's parent run and its child runs are tests/system/test_tune.py's.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid

import boto3
import pytest
import yaml
from mlflow_server import BEST_ARTIFACTS, MlflowServer, runs_tagged, score_steps
from ray_head import SMOKE_TRAIN, TINY_RUN, VENV_BIN, RayHead, sets
from run_history import wait_for_checkpoint
from tcp_gate import TcpGate

from simpsons.tracking import RUN_TAG, SCORE

BUCKET = "tracking"


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), f"s3://{BUCKET}/mlartifacts", s3_server) as server:
        yield server


@pytest.fixture(scope="module")
def head(s3_server):
    with RayHead(num_cpus=4) as head:
        yield head


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


def _flat(config: dict) -> dict[str, str]:
    """best/config.yaml as the params the issue asks for: `section.key`, strings as they are, the rest JSON."""
    return {
        f"{section}.{key}": value if isinstance(value, str) else json.dumps(value)
        for section, values in config.items()
        for key, value in values.items()
    }


@pytest.mark.timeout(540)
def test_a_run_killed_and_rerun_is_one_finished_mlflow_run_with_its_config_history_and_best(
    head, mlflow_server, packed_dataset
):
    """The driver is killed after epoch 1 and the same command runs again: still one MLflow run,
    continued, each epoch logged once; it ends FINISHED with best/config.yaml flattened as its params,
    metrics.json's val macro-F1 history as its metric and best/ as its artifacts."""
    name, epochs = f"tracked-{uuid.uuid4().hex[:6]}", 8
    command = train_command(packed_dataset, name, epochs)
    # The tracking server named the way a cluster's environment names it (run.tracking_uri unset).
    env = {**head.driver_env(), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    client = mlflow_server.client()
    first = head.spawn(command, env)
    run_id = wait_for_epoch(client, name, f"s3://{BUCKET}/runs/{name}", 1, first)
    wait_for_checkpoint(BUCKET, f"runs/{name}", 1, first)  # what the second driver resumes from
    first.kill()  # SIGKILL: the MLflow run is left RUNNING, as when a job's process or node dies
    assert client.get_run(run_id).info.status == "RUNNING"
    head.wait_for_train_workers(0, timeout=60)  # Ray takes the run's workers down with their driver
    logged_first = set(score_steps(client, run_id))

    second = head.spawn(command, env)
    assert second.wait(timeout=300) == 0, second.output[-6000:]
    assert f"MLflow: continuing run {run_id}" in second.output
    runs = runs_tagged(client, name, RUN_TAG, f"s3://{BUCKET}/runs/{name}")  # run.experiment defaults to run.name
    assert [r.info.run_id for r in runs] == [run_id], runs
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert score_steps(client, run_id) == list(range(epochs)), "every epoch once"

    config = yaml.safe_load(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{name}/best/config.yaml")["Body"].read()
    )
    assert config["run"]["tracking_uri"] == mlflow_server.uri and config["run"]["experiment"] == name
    assert run.data.params == _flat(config)

    metrics = s3_json(f"runs/{name}/best/metrics.json")
    assert [h["epoch"] for h in metrics["history"]] == list(range(epochs))
    assert any(h["resumed"] for h in metrics["history"]), "the second driver resumed from a checkpoint"
    # The MLflow figures are the run's own record. An epoch the first driver logged and the second
    # trained again (after its last checkpoint) keeps the figures logged first.
    logged = {m.step: m.value for m in client.get_metric_history(run_id, SCORE)}
    repeated = {h["epoch"] for h in metrics["history"] if h["resumed"]} & logged_first
    assert {e: v for e, v in logged.items() if e not in repeated} == {
        h["epoch"]: h[SCORE] for h in metrics["history"] if h["epoch"] not in repeated
    }

    tags = run.data.tags
    provenance = metrics["provenance"]
    assert tags["simpsons.dataset_uri"] == provenance["dataset_uri"] == str(packed_dataset)
    assert tags["simpsons.manifest_sha256"] == provenance["manifest_sha256"]
    assert tags["simpsons.code_version"] == provenance["code_version"]
    assert (tags["simpsons.world_size"], tags["simpsons.device"], tags["simpsons.precision"]) == ("2", "cpu", "bf16")
    assert tags["simpsons.best_uri"] == f"s3://{BUCKET}/runs/{name}/best"

    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "best")} == BEST_ARTIFACTS
    # The server proxies them into the S3 bucket (--artifacts-destination).
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/")
    stored = {item["Key"] for item in listed.get("Contents", []) if run_id in item["Key"]}
    assert {key.rsplit("/", 1)[-1] for key in stored} == BEST_ARTIFACTS
    checkpoint = io.BytesIO(
        boto3.client("s3").get_object(Bucket=BUCKET, Key=f"runs/{name}/best/checkpoint.pt")["Body"].read()
    )
    import torch

    assert torch.load(checkpoint, weights_only=True)["tracking_run"] == run_id


@pytest.mark.timeout(540)
def test_a_tracking_server_outage_mid_run_loses_no_epoch(head, mlflow_server, packed_dataset):
    # The job reaches the server through a gate that the test shuts (connections refused, open ones
    # cut) for as long as two epochs train, then opens: the outage ends well before the run does on
    # a fast machine too, which a server restart (10-40 s) did not promise. Batches of 2 images per
    # worker make each epoch 40 steps: the outage is over by about epoch 5, half of the run's 12.
    name, epochs = f"outage-{uuid.uuid4().hex[:6]}", 12
    client = mlflow_server.client()
    with TcpGate(mlflow_server.port) as gate:
        tracked = ("--set", f"run.tracking_uri={gate.uri}", "--set", "optim.batch_size=4")
        command = train_command(packed_dataset, name, epochs, *tracked)
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
