"""The online endpoint: a Ray Serve application that answers with a trained model's top-k labels.

    serve run simpsons.serve:app checkpoint=s3://bucket/runs/simpsons/best/model.pt2
    curl -X POST --data-binary @frame.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/predict
    -> {"top": [{"label": "homer_simpson", "prob": 0.93}, ...], "model": "...", "model_sha256": "..."}

    POST /predict   body: one image (Content-Type image/jpeg or image/png; also webp, gif, bmp),
                    at most max_bytes; answers 200 with the top-k labels, or a 4xx with
                    {"error": one sentence} for a body that is not such an image
    GET  /healthz   200 {"status": "ok", ...} once the replica holds its model

Requests are decoded in the replica (off its event loop) and batched for the model: @serve.batch
gathers up to MAX_BATCH_SIZE images, waiting at most BATCH_WAIT_TIMEOUT_S after the first. Replicas
autoscale on their queue length (AUTOSCALING). Each replica takes a GPU when asked (`gpu=true`) or,
by default, when the cluster has one as the application is built. Application arguments
(`serve run ... key=value` or the `args` of a Serve config file):

    checkpoint    required: a run's best/ folder, its checkpoint.pt or model.pt2 (local or s3://)
    top_k         labels per answer (default 3)
    gpu           auto | true | false (default auto)
    min_replicas, max_replicas   autoscaling bounds (default 1 and 4)
    max_bytes     largest accepted body in bytes (default MAX_BODY_BYTES)
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from simpsons.cluster import absolute_dataset_uri
from simpsons.data import decode_image
from simpsons.inference import open_classifier

_logger = logging.getLogger(__name__)

# Up to 32 images per model call: on a CPU a batch of 32 at 128 px takes about a second, so more
# would only add latency; a GPU would take more but is rarely the bottleneck of an HTTP service.
MAX_BATCH_SIZE = 32
# Seconds a batch waits for more requests after its first: 10 ms adds at most that to one request's
# latency and, under load, lets a batch fill.
BATCH_WAIT_TIMEOUT_S = 0.01
MAX_BODY_BYTES = 8 << 20  # a camera frame is well under 1 MB; 8 MiB refuses abuse, not photos
DRAIN_FACTOR = 4  # bodies up to this many times max_bytes are read through before their 413
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")  # what data.load_image reads
# Replicas are added when their average number of requests in flight (queued or in a batch)
# passes one batch, and removed after 5 minutes below it.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": MAX_BATCH_SIZE,
    "upscale_delay_s": 10.0,
    "downscale_delay_s": 300.0,
}
MAX_ONGOING_REQUESTS = 2 * MAX_BATCH_SIZE  # per replica; beyond it the proxy waits for a free replica


def refuse(status: int, sentence: str) -> JSONResponse:
    return JSONResponse({"error": sentence}, status_code=status)


@serve.deployment(
    autoscaling_config=AUTOSCALING,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 1},
)
class Classifier:
    def __init__(self, checkpoint: str, top_k: int = 3, max_bytes: int = MAX_BODY_BYTES):
        self.classifier = open_classifier(checkpoint)
        self.top_k, self.max_bytes = top_k, max_bytes
        _logger.info("serving %s on %s", checkpoint, self.classifier.device)

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/predict": "POST", "/healthz": "GET"}
        if path not in routes:
            return refuse(404, f"No endpoint {path}; POST an image to /predict, or GET /healthz.")
        if method != routes[path]:
            return refuse(405, f"{path} takes {routes[path]}, not {method}.")
        if path == "/healthz":
            c = self.classifier
            return JSONResponse(
                {"status": "ok", "model": c.source, "classes": len(c.class_names), "device": str(c.device)}
            )
        return await self.predict(request)

    async def predict(self, request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in IMAGE_TYPES:
            return refuse(
                415, f"Content-Type {kind or '(none)'} is not an image type; send {' or '.join(IMAGE_TYPES[:2])}."
            )
        too_large = refuse(413, f"The image is over {self.max_bytes:,} bytes; send a smaller one.")
        length = request.headers.get("content-length", "")
        if length and not length.isdigit():
            return refuse(400, f"Content-Length {length!r} is not a number of bytes.")
        # A body a little over the limit is read to its end (and dropped) before the 413, so that the
        # client, still sending, reads the answer instead of a reset connection; a far larger one is not.
        if length and int(length) > DRAIN_FACTOR * self.max_bytes:
            return too_large
        body, received = bytearray(), 0
        async for chunk in request.stream():  # a body without Content-Length is cut off too
            received += len(chunk)
            if received > DRAIN_FACTOR * self.max_bytes:
                return too_large
            if received <= self.max_bytes:
                body += chunk
        if received > self.max_bytes:
            return too_large
        image, reason = await asyncio.to_thread(decode_image, bytes(body), self.classifier.stored_size)
        if image is None:
            return refuse(400, f"The body is not a usable image ({reason}); send a JPEG or PNG file's bytes.")
        top = await self.classify(image)
        return JSONResponse({"top": top, "model": self.classifier.source, "model_sha256": self.classifier.sha256})

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def classify(self, images: list[np.ndarray]) -> list[list[dict]]:
        # The model runs in a thread, so that the replica keeps taking requests for the next batch.
        return await asyncio.to_thread(self.classifier.top_k, np.stack(images), self.top_k)  # (B, S, S, 3) uint8


def wants_gpu(gpu: str | bool) -> bool:
    """`gpu` as an application argument: true, false, or auto (the connected cluster has a GPU now)."""
    value = str(gpu).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    if value != "auto":
        raise ValueError(f"gpu={gpu!r} is not one of auto, true, false.")
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def app(args: dict) -> serve.Application:
    """The application builder of `serve run simpsons.serve:app checkpoint=...` (see the module's docstring)."""
    known = {"checkpoint", "top_k", "gpu", "min_replicas", "max_replicas", "max_bytes"}
    unknown = sorted(set(args) - known)
    if unknown or not args.get("checkpoint"):
        raise ValueError(
            f"simpsons.serve:app takes checkpoint=<best/ folder, checkpoint.pt or model.pt2> and optionally "
            f"{', '.join(sorted(known - {'checkpoint'}))}; got {', '.join(unknown) or 'no checkpoint'}."
        )
    autoscaling = {
        **AUTOSCALING,
        "min_replicas": int(args.get("min_replicas", AUTOSCALING["min_replicas"])),
        "max_replicas": int(args.get("max_replicas", AUTOSCALING["max_replicas"])),
    }
    resources = {"num_cpus": 1, "num_gpus": 1} if wants_gpu(args.get("gpu", "auto")) else {"num_cpus": 1}
    deployment = Classifier.options(autoscaling_config=autoscaling, ray_actor_options=resources)
    return deployment.bind(
        absolute_dataset_uri(
            str(args["checkpoint"])
        ),  # a relative path means this process's folder int(args.get("top_k", 3)), int(args.get("max_bytes", MAX_BODY_BYTES))
    )
