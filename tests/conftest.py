"""Shared fixtures: test-written images, a real local Ray cluster, a real S3 server on loopback."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from synthetic import make_image_tree

# Ray workers inherit these. Ray Train notices a finished worker at its next health check (every
# 2 s by default), which the many short fits here would wait for; uv must not rebuild the
# workers' environment (they use this one).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every Ray instance started without a temp dir of its own (the ray_cluster fixture, a job run the
# way users run it) keeps its session folder (logs, sockets, spilled objects) here instead of
# /tmp/ray, where hundreds of megabytes would pile up run after run; removed when the tests end.
# A short path: Ray's unix sockets live below it.
_RAY_TMPDIR = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")
os.environ["RAY_TMPDIR"] = _RAY_TMPDIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "simpsons_dataset"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """A small learnable tree in the original layout: 4 classes, train/val, JPEG and PNG files."""
    return make_image_tree(tmp_path_factory.mktemp("images"), per_split={"train": 40, "val": 12}, size=48)


@pytest.fixture(scope="session")
def packed_dataset(image_tree, tmp_path_factory) -> Path:
    from simpsons.prepare import pack_tree

    out = tmp_path_factory.mktemp("packed")
    pack_tree(image_tree, out, stored_size=40, workers=1)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's threaded server) on 127.0.0.1 with test credentials in the environment.

    Set before Ray starts so Ray workers (which inherit the raylet's environment) reach it too.
    """
    from moto.server import ThreadedMotoServer

    from simpsons.cluster import free_port  # imports ray: here, so the gpu tests run where Ray is not installed

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the test S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_cluster(s3_server, request):
    """A local Ray cluster per test module (4 logical CPUs on 2 cores), stopped at its end.

    Per module, not per session: a Train run in a long-lived session once waited forever for its
    worker group after other modules' runs, and a fresh cluster costs only a few seconds.
    """
    import ray

    from simpsons.cluster import init_ray

    # The jobs' own way to start a local cluster; it names the dashboard's address in
    # RAY_API_SERVER_ADDRESS for every Ray process (see init_ray), restored afterwards.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    saved_address = os.environ.pop("RAY_ADDRESS", None)  # this fixture's cluster, never another
    # A module may size the object store (RAY_OBJECT_STORE_BYTES), e.g. to show that a job streams.
    init_ray(num_cpus=4, object_store_memory=getattr(request.module, "RAY_OBJECT_STORE_BYTES", None))
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address


TIERS = ("unit", "integration", "system", "gpu")


def pytest_collection_modifyitems(items):
    """Each test carries its folder's tier as a marker (`-m "not system"`), and a test outside the
    four folders is an error: every test is in exactly one tier."""
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid} is not in a tier folder; move it under tests/{{{','.join(TIERS)}}}/."
            )
        item.add_marker(tier)
