"""The online endpoint (simpsons/serve.py) over real HTTP: Ray Serve's proxy on 127.0.0.1, a real local
Ray cluster, the exported model read from the loopback S3 server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests
from checkpoints import trained_checkpoint
from synthetic import make_image_tree

from simpsons.cluster import free_port
from simpsons.deploy import export_model
from simpsons.inference import load_checkpoint, predict_files
from simpsons.serve import MAX_BODY_BYTES, app
from simpsons.storage import upload_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from serving import CONTENT_TYPES, hammer  # noqa: E402  (the benchmark's own load generator)


@pytest.fixture(scope="module")
def best(tmp_path_factory) -> Path:
    best = trained_checkpoint(tmp_path_factory.mktemp("run") / "best")
    model, cfg, class_names, _ = load_checkpoint(best, "cpu")
    export_model(model, cfg, class_names, best / "model.pt2")
    return best


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = make_image_tree(tmp_path_factory.mktemp("images"), per_split={"val": 5}, size=56)
    return sorted((root / "dataset" / "val").rglob("pic_*"))  # 20 files, JPEG and PNG


@pytest.fixture(scope="module")
def endpoint(ray_cluster, s3_server, best):
    """http://127.0.0.1:<port> of the application, its model.pt2 read from S3; Serve shut down after."""
    import boto3
    from ray import serve

    boto3.client("s3").create_bucket(Bucket="models")
    upload_dir(best, "s3://models/runs/best")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"checkpoint": "s3://models/runs/best/model.pt2", "max_replicas": 2}), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(endpoint: str, body: bytes, kind: str | None, path: str = "/predict") -> requests.Response:
    return requests.post(endpoint + path, data=body, headers={"Content-Type": kind} if kind else {}, timeout=60)


def test_health_and_labels_equal_predict_pys(endpoint, best, images):
    health = requests.get(endpoint + "/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": "s3://models/runs/best/model.pt2",
        "classes": 4,
        "device": "cpu",
    }
    expected = {r["path"]: r["top"] for r in predict_files(best / "model.pt2", images, top_k=3)}
    for path in images:
        answer = post(endpoint, path.read_bytes(), CONTENT_TYPES[path.suffix])
        assert answer.status_code == 200, answer.text
        got = answer.json()["top"]
        assert [t["label"] for t in got] == [t["label"] for t in expected[str(path)]], path
        assert [t["prob"] for t in got] == pytest.approx([t["prob"] for t in expected[str(path)]], abs=1e-5)


def test_twenty_concurrent_clients_lose_no_request(endpoint, images):
    bodies = [(p.read_bytes(), CONTENT_TYPES[p.suffix]) for p in images]
    reference = [post(endpoint, body, kind).json()["top"][0]["label"] for body, kind in bodies]
    latencies, failures, wall = hammer(endpoint + "/predict", bodies, clients=20, total=200)
    assert failures == [] and len(latencies) == 200
    # Batched with other requests, every image still gets its own answer.
    assert all(hammer.answers[i]["top"][0]["label"] == reference[i % len(bodies)] for i in range(200))
    p50, p99 = sorted(latencies)[99] * 1000, sorted(latencies)[197] * 1000
    print(f"20 clients, 200 requests: p50 {p50:.0f} ms, p99 {p99:.0f} ms, {200 / wall:.1f} requests/s")


def test_replicas_scale_up_on_queue_length(endpoint, images):
    # 48 clients keep 48 requests in flight: over one batch (target_ongoing_requests 32) per replica,
    # so after upscale_delay_s the autoscaler asks for a second replica (max_replicas 2 here).
    import threading

    from ray import serve

    def running() -> int:
        states = serve.status().applications["default"].deployments["Classifier"].replica_states
        return states.get("RUNNING", 0)

    assert running() == 1
    stop, body, kind = threading.Event(), images[0].read_bytes(), CONTENT_TYPES[images[0].suffix]

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                session.post(endpoint + "/predict", data=body, headers={"Content-Type": kind}, timeout=60)

    clients = [threading.Thread(target=client) for _ in range(48)]
    for thread in clients:
        thread.start()
    try:
        deadline = time.monotonic() + 120
        while running() < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert running() == 2
    finally:
        stop.set()
        for thread in clients:
            thread.join()


@pytest.mark.parametrize(
    "body, kind, path, method, status, sentence",
    [
        (b"hello", "text/plain", "/predict", "POST", 415, "Content-Type text/plain is not an image type"),
        (b"hello", None, "/predict", "POST", 415, "Content-Type (none)"),
        (b"hello", "image/jpeg", "/predict", "POST", 400, "The body is not a usable image (cannot decode"),
        (b"", "image/png", "/predict", "POST", 400, "empty file (0 bytes)"),
        (b"\xff" * (MAX_BODY_BYTES + 1), "image/jpeg", "/predict", "POST", 413, "The image is over 8,388,608 bytes"),
        (b"", None, "/predict", "GET", 405, "/predict takes POST, not GET."),
        (b"", None, "/nothing", "GET", 404, "No endpoint /nothing"),
    ],
    ids=["wrong-type", "no-type", "not-an-image", "empty", "too-large", "wrong-method", "unknown-path"],
)
def test_a_bad_request_gets_a_4xx_and_one_sentence(endpoint, images, body, kind, path, method, status, sentence):
    headers = {"Content-Type": kind} if kind else {}
    answer = requests.request(method, endpoint + path, data=body, headers=headers, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error.startswith(sentence) or sentence in error, error
    assert error.count(". ") == 0 and error.endswith(".")  # one sentence
    # The replica lives on and answers the next good request.
    assert post(endpoint, images[0].read_bytes(), CONTENT_TYPES[images[0].suffix]).status_code == 200


def test_the_builder_takes_serve_runs_string_arguments_and_refuses_unknown_or_missing_ones():
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    # What `serve run simpsons.serve:app checkpoint=... max_replicas=2 gpu=false` hands the builder.
    built = call_user_app_builder_with_args_if_necessary(
        app, {"checkpoint": "s3://b/best", "max_replicas": "2", "top_k": "5", "gpu": "false"}
    )
    assert isinstance(built, Application)
    with pytest.raises(ValueError, match="takes checkpoint=.*got no checkpoint"):
        app({})
    with pytest.raises(ValueError, match="got checkpont"):
        app({"checkpont": "best"})
    with pytest.raises(ValueError, match="gpu='maybe' is not one of auto, true, false"):
        app({"checkpoint": "best", "gpu": "maybe"})
