"""Instance-role credentials, as the cluster's nodes get them: no AWS keys anywhere.

The static keys are unset and `AWS_EC2_METADATA_SERVICE_ENDPOINT` points at a real moto server on
127.0.0.1, which answers the EC2 instance metadata endpoints (IMDSv2 token, then the role's
temporary credentials) as well as S3. `jobs/prepare_data.py` and a training run (a real Ray head,
`python jobs/train.py`) then read from and write to S3 with those credentials alone. The server
notes who signed each request with what, so the test sees that both boto3 (the job's own
transfers) and pyarrow's AWS SDK (Ray Train's checkpoints) used the role: success alone would not
show it, since moto takes some unsigned requests (an anonymous PutObject succeeds there). Nothing
is mocked.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer
from ray_head import REPO, VENV_BIN, RayHead, sets
from s3_objects import clear_credentials
from synthetic import make_image_tree

from simpsons.cluster import free_port
from simpsons.report import OUTPUT_FILES

# The dataset's image sizes, for prepare and for training.
SMALL_IMAGES = {"data.stored_size": 40, "data.train_size": 32}

# What moto's metadata endpoint hands out as the role's temporary credentials.
ROLE_KEY_ID, ROLE_SESSION_TOKEN = "test-key", "test-session-token"
SIGNED_BY = re.compile(r"Credential=([^/]+)/")


# EC2's metadata service lists the role at this path with or without a trailing slash; the AWS C++
# SDK inside pyarrow asks without it, moto answers only the documented form with it.
ROLE_LIST = "/latest/meta-data/iam/security-credentials"


class RecordingMotoServer(ThreadedMotoServer):
    """moto's threaded server on 127.0.0.1 that also notes, per request: method, path, which client
    sent it (User-Agent) and the access key id and session token it was signed with. The one
    change to what moto answers: ROLE_LIST without the slash is served as EC2 serves it."""

    def __init__(self):
        super().__init__(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.requests: list[dict] = []

    def start(self) -> None:
        super().start()
        app = self._server.app

        def recording(environ, start_response):
            signed = SIGNED_BY.search(environ.get("HTTP_AUTHORIZATION", ""))
            self.requests.append(
                {
                    "method": environ["REQUEST_METHOD"],
                    "path": environ.get("PATH_INFO", ""),
                    "agent": environ.get("HTTP_USER_AGENT", ""),
                    "key_id": signed.group(1) if signed else None,
                    "token": environ.get("HTTP_X_AMZ_SECURITY_TOKEN"),
                }
            )
            if environ.get("PATH_INFO") == ROLE_LIST:  # moto reads the raw URI too
                for name in ("PATH_INFO", "RAW_URI", "REQUEST_URI"):
                    environ[name] = ROLE_LIST + "/"
            return app(environ, start_response)

        self._server.app = recording  # werkzeug's handler calls server.app for every request

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._port}"


@pytest.fixture
def role_server(monkeypatch, tmp_path):
    """The loopback server, and this process's environment as an instance with a role sees it."""
    server = RecordingMotoServer()
    server.start()
    try:
        clear_credentials(monkeypatch, tmp_path)  # the role is the only way in
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server
    finally:
        server.stop()


def admin_s3(server: RecordingMotoServer):
    """The test's own client (the bucket's owner, not the job): explicit keys, never in the environment."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin-secret",
    )


def python(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "python"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_prepare_and_train_through_s3_with_the_instance_role_alone(role_server, tmp_path, monkeypatch):
    bucket = f"role-{uuid.uuid4().hex[:12]}"
    admin_s3(role_server).create_bucket(Bucket=bucket)
    source = make_image_tree(tmp_path / "photos", per_split={"train": 16, "val": 8}, size=40)
    prepare = [
        "jobs/prepare_data.py",
        "--source",
        str(source),
        "--dest",
        f"s3://{bucket}/simpsons",
        "--name",
        "synthetic",
        *sets({**SMALL_IMAGES, "data.pack_workers": 1, "data.cache_dir": tmp_path / "prepare_cache"}),
    ]

    # Without a metadata endpoint that answers, there are no credentials at all: the job says so.
    with monkeypatch.context() as no_role:
        no_role.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        refused = python(prepare, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "No AWS credentials found" in refused.stderr, refused.stderr[-3000:]

    # With the role: prepare uploads the dataset ...
    role_server.requests.clear()
    prepared = python(prepare, timeout=300)
    assert prepared.returncode == 0, (prepared.stdout + prepared.stderr)[-6000:]
    data_uri = f"s3://{bucket}/simpsons/datasets/synthetic/v1"
    assert data_uri in prepared.stdout

    # ... and a training run on a real Ray head (its raylet and workers inherit this environment)
    # reads it and keeps its checkpoints and best/ in S3.
    with RayHead(num_cpus=2) as head:
        trained = head.run(
            [
                str(VENV_BIN / "python"),
                "jobs/train.py",
                "--config",
                "configs/smoke.yaml",
                *sets({"data.uri": data_uri, **SMALL_IMAGES, "data.cache_dir": tmp_path / "node_cache"}),
                *sets({"optim.epochs": 1, "optim.batch_size": 16, "train.workers": 1, "train.cpus_per_worker": 1}),
                *sets({"train.histogram_every": 0, "run.storage": f"s3://{bucket}/runs", "run.name": "role"}),
            ],
            env=head.driver_env(),
            timeout=420,
        )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-6000:]
    sent_by_jobs = list(role_server.requests)  # before the test's own look at the bucket

    listed = admin_s3(role_server).list_objects_v2(Bucket=bucket, Prefix="runs/role/")
    keys = {item["Key"][len("runs/role/") :] for item in listed.get("Contents", [])}
    assert set(OUTPUT_FILES) <= {k[len("best/") :] for k in keys if k.startswith("best/")}, sorted(keys)
    assert any(k.startswith("checkpoint_") and k.endswith("/checkpoint.pt") for k in keys), sorted(keys)

    # The role's credentials came from the metadata endpoint (IMDSv2: a token first) ...
    paths = {r["path"] for r in sent_by_jobs}
    assert "/latest/api/token" in paths
    assert "/latest/meta-data/iam/security-credentials/default-role" in paths
    fetched_by = {
        r["agent"].split("/")[0].lower()
        for r in sent_by_jobs
        if r["path"] == "/latest/meta-data/iam/security-credentials/default-role"
    }
    assert "aws-sdk-cpp" in fetched_by and fetched_by & {"botocore", "boto3"}, fetched_by
    # ... and every S3 request the jobs sent was signed with them, by boto3 and by pyarrow alike.
    s3_requests = [r for r in sent_by_jobs if not r["path"].startswith("/latest/")]
    unsigned = [r for r in s3_requests if (r["key_id"], r["token"]) != (ROLE_KEY_ID, ROLE_SESSION_TOKEN)]
    assert not unsigned, f"S3 requests not signed with the role's credentials: {unsigned[:5]}"
    sent = {(r["agent"].split("/")[0].lower(), r["method"]) for r in s3_requests}
    assert {("boto3", "PUT"), ("boto3", "GET")} <= sent, sorted(sent)  # the upload, the workers' download
    assert ("aws-sdk-cpp", "PUT") in sent, sorted(sent)  # Ray Train's checkpoints through pyarrow
