"""Latency and throughput of the online endpoint (simpsons/serve.py) under concurrent clients.

    python bench/serving.py                          # the real sample's images, the default model
    python bench/serving.py --checkpoint runs/local/best/model.pt2 --clients 20 --requests 400

Starts a local Ray cluster and Serve's HTTP proxy on 127.0.0.1 (a free port), deploys
`simpsons.serve:app` with one replica (this machine's CPUs are what is measured, not autoscaling),
and lets --clients threads POST the images as JPEG/PNG bodies, --requests in all, each client
waiting for its answer before sending the next. Prints:

    p50_ms, p99_ms      latency of one request (send to parsed answer), milliseconds
    requests_per_s      answered requests over the wall time of the run
    failed              requests not answered 200 (must be 0)

Without --checkpoint the model is the default config's network with its initial weights, exported
as model.pt2: the weights do not change the time a request takes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import add_image_args, default_best, emit, image_tree, note, stdout_to_stderr

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def image_bodies(tree: Path, count: int) -> list[tuple[bytes, str]]:
    """(bytes, Content-Type) of up to `count` JPEG/PNG files of the tree, in a fixed order."""
    files = sorted(p for p in tree.rglob("*") if p.suffix.lower() in CONTENT_TYPES)[:count]
    return [(p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in files]


def hammer(url: str, bodies: list[tuple[bytes, str]], clients: int, total: int) -> tuple[list[float], list, float]:
    """`clients` threads POST bodies[i % len(bodies)] for i in range(total), one request in flight
    each. Returns (latencies in seconds of the 200 answers, [(i, status or error, answer)] of the
    others, wall seconds); answers are kept in `hammer.answers[i]` for checking."""
    import requests

    answers: dict[int, dict] = {}
    latencies, failures, lock = [], [], threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body, kind = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    response = session.post(url, data=body, headers={"Content-Type": kind}, timeout=60)
                    answer, status = response.json(), response.status_code
                except Exception as exc:  # a lost request is counted, not raised
                    answer, status = None, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                        answers[i] = answer
                    else:
                        failures.append((i, status, answer))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hammer.answers = answers
    return latencies, failures, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="best/ folder, checkpoint.pt or model.pt2 (default: see above)")
    add_image_args(parser)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="40 requests: checks that it runs")
    args = parser.parse_args()
    total = 40 if args.quick else args.requests
    bodies = image_bodies(image_tree(args.images, Path(args.cache), args.archive), 200)

    import ray
    from ray import serve

    from simpsons.cluster import free_port, init_ray
    from simpsons.serve import BATCH_WAIT_TIMEOUT_S, MAX_BATCH_SIZE, app

    with tempfile.TemporaryDirectory() as folder, stdout_to_stderr():
        checkpoint = args.checkpoint or str(default_best(Path(folder)) / "model.pt2")
        init_ray(num_cpus=2, log_to_driver=False)  # workers' lines stay in their logs: stdout holds the figures
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app({"checkpoint": checkpoint, "min_replicas": 1, "max_replicas": 1}), route_prefix="/")
            url = f"http://127.0.0.1:{port}/predict"
            hammer(url, bodies, args.clients, min(total, 2 * args.clients))  # warm-up: first batches, threads
            note(
                f"{args.clients} clients, {total} requests of {len(bodies)} images, 1 replica, "
                f"batches of up to {MAX_BATCH_SIZE} waiting {BATCH_WAIT_TIMEOUT_S * 1000:g} ms"
            )
            latencies, failures, wall = hammer(url, bodies, args.clients, total)
        finally:
            serve.shutdown()
            ray.shutdown()
    ms = np.array(latencies) * 1000
    emit("p50_ms", float(np.percentile(ms, 50)) if len(ms) else 0.0)
    emit("p99_ms", float(np.percentile(ms, 99)) if len(ms) else 0.0)
    emit("requests_per_s", len(latencies) / wall)
    emit("failed", len(failures), 0)
    if failures:
        note(f"first failures: {failures[:3]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
