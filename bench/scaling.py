"""Ray Train scaling: the training job with 1 and 2 workers on one machine, per-worker img/s and efficiency.

    python bench/scaling.py                          # real sample subset, CPU, 1 CPU per worker
    python bench/scaling.py --workers 1 2 4 8 --address auto --gpu   # on a running Ray cluster

Weak scaling, as when nodes are added: every worker keeps the same per-worker batch and the same
resources (train.cpus_per_worker CPUs and as many torch threads, or one GPU), so the global batch
grows with the number of workers. Each run is the real job (simpsons.driver.build_trainer(...).fit()
on a packed dataset): resident data, augmentation, DDP all-reduce, per-epoch evaluation and
checkpoint. The figure is the job's own per-epoch metric `train_img_per_s` (all workers' training
images over the epoch's training time) of the LAST epoch, as the first includes warm-up.

Figures (stdout, `name value`), for each N in --workers:
  total_img_per_s_wN       all workers together
  per_worker_img_per_s_wN  total / N
  efficiency_wN            per_worker at N / per_worker at the smallest N (1.0 = perfect)
  fit_s_wN                 wall time of the whole fit (worker start-up, all epochs, checkpoints)

On a 2-core machine, 2 workers of 1 CPU fill both cores: the efficiency then also pays for the two
workers sharing memory bandwidth and caches and for Ray's own processes on the same cores.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import add_common_args, add_size_arg, emit, image_tree, load_average, note, stored_size_for

# Before Ray starts, so its workers inherit them: Ray Train notices a finished worker at its next
# health check (every 2 s by default), and uv must not rebuild the workers' environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from simpsons.config import load_config
from simpsons.data import find_layout, pack_split, scan_split
from simpsons.dataset import read_manifest, write_packed
from simpsons.files import cache_key


def subset_dataset(tree: Path, cache: Path, stored: int, train_images: int, val_images: int, seed: int = 0) -> Path:
    """Pack a seeded random subset of the tree's train and val splits once (small epochs, same images)."""
    splits = find_layout(tree).splits
    base = splits["train"].parent
    key = cache_key(f"{tree.resolve()}|{stored}|{train_images}|{val_images}|{seed}")
    out = cache / "subsets" / key
    try:
        read_manifest(out)
        return out
    except ValueError:
        pass
    packed = {}
    for name, limit in (("train", train_images), ("val", val_images)):
        records = scan_split(splits[name], root=base)
        random.Random(seed).shuffle(records)
        packed[name] = pack_split(records[:limit], stored, desc=f"pack {name} subset")
    write_packed(out, packed, stored, extra_manifest={"subset_of": str(tree)})
    return out


def run_job(cfg, dataset: str, workers: int) -> tuple[float, float]:
    """(training img/s of all workers in the last epoch, wall seconds of the fit)."""
    from simpsons.cluster import resolve_resources
    from simpsons.driver import build_trainer

    cfg = resolve_resources(cfg)
    note(
        f"fit with {workers} worker(s): {'GPU' if cfg.train.use_gpu else 'CPU'}, {cfg.train.cpus_per_worker:g} CPU(s) "
        f"each, global batch {cfg.optim.batch_size}, {cfg.optim.epochs} epochs"
    )
    started = time.perf_counter()
    result = build_trainer(cfg, dataset, name=f"scaling-w{workers}").fit()
    elapsed = time.perf_counter() - started
    if getattr(result, "error", None):
        raise RuntimeError(f"The {workers}-worker fit failed: {result.error}")
    return float(result.metrics["train_img_per_s"]), elapsed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "tiny run for tests: 32 px, batch 8 per worker, 64 train / 16 val images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default: 1 2)")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default: %(default)s)"
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (needs a cluster with GPUs)")
    parser.add_argument(
        "--address", help="a running Ray cluster (e.g. auto); default: start a local one on 127.0.0.1 and stop it after"
    )
    add_size_arg(parser)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch (default: %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="epochs per fit; the last one is measured (default: %(default)s)"
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=0,
        help="training images in the subset (default: 8 steps per worker at the largest worker count)",
    )
    parser.add_argument(
        "--val-images", type=int, default=128, help="validation images in the subset (default: %(default)s)"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.size, args.batch, args.train_images, args.val_images = 32, 8, 64, 16
    args.workers = sorted(set(args.workers))
    cache = Path(args.cache)
    tree = image_tree(args.images, cache, args.archive)
    stored = stored_size_for(args.size)
    train_images = args.train_images or 8 * args.batch * max(args.workers)
    dataset = subset_dataset(tree, cache, stored, train_images, args.val_images)
    note(f"dataset: {dataset} ({read_manifest(dataset)['splits']['train']['images']} train images from {tree})")

    import ray

    from simpsons.cluster import init_ray

    storage = tempfile.mkdtemp(prefix="simpsons-scaling-")
    rates, fit_seconds = {}, {}
    load_start = load_average()
    try:
        if not args.address:
            os.environ.pop("RAY_ADDRESS", None)  # without --address: our own cluster, never someone else's
        # Workers' lines stay in their logs (stdout holds the figures); a failed fit raises with its error.
        init_ray(
            args.address, num_cpus=max(1, math.ceil(max(args.workers) * args.cpus_per_worker)), log_to_driver=False
        )
        for workers in args.workers:
            overrides = [
                f"data.train_size={args.size}",
                f"data.stored_size={stored}",
                f"optim.batch_size={args.batch * workers}",
                f"optim.epochs={args.epochs}",
                f"train.workers={workers}",
                f"train.cpus_per_worker={args.cpus_per_worker}",
                f"train.use_gpu={'true' if args.gpu else 'false'}",
                f"run.storage={storage}",
                f"run.name=scaling-w{workers}",
                "train.histogram_every=0",
            ]
            cfg = load_config(args.config, overrides + args.set)
            rates[workers], fit_seconds[workers] = run_job(cfg, str(dataset), workers)
            note(
                f"{workers} worker(s): {rates[workers]:.1f} img/s in all, {rates[workers] / workers:.1f} per worker "
                f"(load {load_average():.2f})"
            )
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    first = args.workers[0]
    for workers in args.workers:
        emit(f"total_img_per_s_w{workers}", rates[workers])
        emit(f"per_worker_img_per_s_w{workers}", rates[workers] / workers)
        emit(f"efficiency_w{workers}", (rates[workers] / workers) / (rates[first] / first), 3)
        emit(f"fit_s_w{workers}", fit_seconds[workers], 1)
    emit("cpus_per_worker", args.cpus_per_worker, 2)
    emit("per_worker_batch", args.batch, 0)
    emit("image_size", args.size, 0)
    emit("load_avg_1m_start", load_start)
    emit("load_avg_1m_end", load_average())


if __name__ == "__main__":
    from simpsons.cli import run_job as run_cli

    run_cli(main, get_args_parser(), log_stream=sys.stderr)  # stdout holds only the figures
