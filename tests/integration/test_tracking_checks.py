"""What a job refuses before Ray starts when run.tracking_uri is set, each in one sentence with
exit 2: an unreachable tracking URI, a tracking URI without the mlflow package (its import blocked
in the job's process), and an experiment the user may not write to (a real `mlflow server` with
basic auth on 127.0.0.1)."""

from __future__ import annotations

import sys
import time
import uuid

import boto3
from mlflow_server import MlflowServer, job_env, run_job
from ray_head import SMOKE_TRAIN, sets

from simpsons.cluster import free_port

BUCKET = "tracking"


def test_an_unreachable_tracking_uri_is_refused_before_ray_in_one_sentence(packed_dataset, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = run_job(
        [sys.executable, *SMOKE_TRAIN, *sets({"data.uri": packed_dataset, "run.storage": tmp_path / "runs"})],
        job_env(MLFLOW_TRACKING_URI=uri),  # the environment's URI counts when the config leaves it empty
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
    done = run_job([sys.executable, "-c", blocked, *SMOKE_TRAIN, *args], job_env())
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
    with server:
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
        done = run_job([sys.executable, *SMOKE_TRAIN, *args], job_env(MLFLOW_TRACKING_URI=server.uri, **creds))
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: The MLflow server at {server.uri} refuses this user write access to experiment 'team' "
            "(HTTP 403); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, ask for "
            "EDIT permission on it, or set run.experiment to one you may write to."
        ], done.stderr + server.log_tail()
        assert "Ray" not in done.stdout + done.stderr and user[1] not in done.stdout + done.stderr
