"""Training throughput on one CUDA GPU: the training step and a whole epoch, data resident on the device.

    python bench/gpu.py                        # real sample if present, else random images of its shape
    python bench/gpu.py --batch 1024 --compile
    python bench/gpu.py --device cpu --quick   # the same code path on the CPU (a wiring check, not a figure)
    python bench/gpu.py --set data.resident_share=0   # the host-memory data path instead

The packed uint8 images and labels live in GPU memory (simpsons.data.ResidentSplit on cuda; in
host memory, gathered per batch into pinned buffers, when they do not fit data.resident_share of the free memory), each
batch is augmented on the GPU in one grid_sample (simpsons.augment), and the step is
simpsons.engine.TrainStep: bf16 autocast (the config's "auto" on a GPU with bf16), channels_last,
fused AdamW (build_components), cudnn.benchmark, per-GPU batch 512 by default. One process
drives one GPU, so every figure is per GPU.

Figures (stdout, `name value`):
  train_step_img_per_s   full training step (batch gather + augmentation + forward/backward/step)
  model_step_img_per_s   the same step on a ready input tensor (the network alone)
  data_path_fraction     train_step / model_step
  epoch_img_per_s        training images / wall time of a whole epoch: train + evaluation of the
                         val split + metrics, as the worker's loop does (no checkpoint writing)
  epoch_s, eval_img_per_s, peak_mem_gib
Without CUDA it prints one line `skipped ...` and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    ReadyInputs,
    add_common_args,
    add_size_arg,
    emit,
    forever,
    note,
    packed,
    real_sample_tree,
    skip,
    stored_size_for,
)

from simpsons.config import load_config
from simpsons.data import CLASS_NAMES, ResidentSplit, data_placement
from simpsons.dataset import load_packed, read_manifest
from simpsons.engine import evaluate, synchronize, train_one_epoch
from simpsons.metrics import classification_report
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_preset, create_train_step

# The real sample's split sizes, used for random data when no images are at hand.
RANDOM_TRAIN, RANDOM_VAL = 11903, 2337


def load_splits(args, stored: int, device: torch.device, share: float):
    """(train split, val split, train class counts, where the images came from), placed as training places them."""
    cache = Path(args.cache)
    tree = Path(args.images) if args.images else (None if args.random else real_sample_tree(cache, args.archive))
    if tree is not None:
        dataset_dir = packed(tree, cache, stored)
        arrays = [load_packed(dataset_dir, name) for name in ("train", "val")]
        counts, source = read_manifest(dataset_dir)["splits"]["train"]["class_counts"], str(tree)
    else:
        # Throughput does not depend on the pixels: random uint8 images of the real sample's shape.
        n_train, n_val = (256, 64) if args.quick else (RANDOM_TRAIN, RANDOM_VAL)
        rng = np.random.default_rng(0)
        arrays = [
            (rng.integers(0, 256, (n, stored, stored, 3), dtype=np.uint8), rng.integers(0, len(CLASS_NAMES), n))
            for n in (n_train, n_val)
        ]
        counts = np.bincount(arrays[0][1], minlength=len(CLASS_NAMES)).tolist()
        source = f"random uint8 images ({n_train} train, {n_val} val)"
    on_device, placement = data_placement(sum(a.nbytes for pair in arrays for a in pair), device, share)
    note(f"data: train + val {placement}")
    train, val = (ResidentSplit(*pair, device=device, on_device=on_device) for pair in arrays)
    return train, val, counts, source


def time_steps(step, batches, steps: int, preset, seed: int) -> tuple[int, float]:
    """(images, seconds) of `steps` steps of simpsons.engine.train_one_epoch at `preset`'s side,
    from an idle GPU to an idle GPU."""
    synchronize(step.device)
    trained = train_one_epoch(step, itertools.islice(batches, steps), preset, seed, epoch=0)
    return trained.images, trained.seconds


def run_epoch(step, train, val, plan: Plan, batch: int, epoch: int) -> tuple[float, float]:
    """One epoch as the worker runs it, at a fixed side -> (train + eval seconds, eval seconds)."""
    synchronize(step.device)
    started = time.perf_counter()
    train_one_epoch(step, train.train_batches(epoch, batch, plan.seed), plan.train, plan.seed, epoch)
    eval_started = time.perf_counter()
    cm, _ = evaluate(
        step.model,
        step.criterion,
        val,
        plan.eval,
        plan.dtype,
        plan.eval_batch,
        len(CLASS_NAMES),
        pad_last=plan.pad_eval,
    )
    classification_report(cm, CLASS_NAMES)  # the per-epoch report the loop computes
    finished = time.perf_counter()
    return finished - started, finished - eval_started


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "tiny run for tests: 32 px, batch 16, few steps, 256 random images unless --images")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the code path without a GPU"
    )
    add_size_arg(parser)
    parser.add_argument("--batch", type=int, default=512, help="per-GPU batch (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=30, help="untimed steps first (cudnn.benchmark tuning; default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=100, help="timed steps (default: %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="timed whole epochs, after one untimed (default: %(default)s)"
    )
    parser.add_argument(
        "--random", action="store_true", help="random images of the real sample's shape, even if the sample is here"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (its compile time is not timed)"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        skip(
            "CUDA is not available on this machine (torch.cuda.is_available() is False); run bench/gpu.py on a machine "
            "with an NVIDIA GPU, or pass --device cpu to check the code path."
        )
    if args.quick:
        args.size, args.batch, args.warmup, args.steps, args.epochs = 32, 16, 2, 4, 1
        if device.type == "cpu":
            torch.set_num_threads(1)  # on a busy machine two threads of tiny ops stall on each other
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the worker does: fixed shapes, pick the fastest kernels
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU (code-path check only)"
    stored = stored_size_for(args.size)
    base = [f"data.train_size={args.size}", f"data.stored_size={stored}", f"optim.batch_size={args.batch}"]
    cfg = load_config(args.config, base + args.set)
    train, val, counts, source = load_splits(args, cfg.data.stored_size, device, cfg.data.resident_share)
    if len(train) < args.batch:
        raise SystemExit(
            f"error: the train split has {len(train)} images, fewer than one batch of {args.batch}; use a smaller --batch."
        )

    def make_step():
        model, criterion, optimizer = build_components(cfg, counts, device)
        if args.compile:
            model = torch.compile(model)
        scheduler = create_scheduler(optimizer, cfg, train.steps_per_epoch(args.batch))
        return create_train_step(cfg, model, criterion, optimizer, scheduler)

    # Every timed step at --size: the full step's preset and the bare step's ready inputs alike.
    step, bare = make_step(), make_step()
    preset, ready_inputs = create_train_preset(cfg, args.size), ReadyInputs(args.size)
    plan = Plan.of(cfg, device)
    note(
        f"bench/gpu.py on {name}, torch {torch.__version__}: {source}, {args.size} px, batch {args.batch}, "
        f"precision {cfg.train.precision} ({step.dtype}), channels_last {cfg.train.channels_last}, "
        f"fused AdamW {device.type == 'cuda'}, compile {args.compile}"
    )

    epoch_counter = iter(range(1 << 30))
    batches = forever(lambda: train.train_batches(next(epoch_counter), args.batch, cfg.train.seed))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
    y = torch.randint(0, len(CLASS_NAMES), (args.batch,), device=device)
    ready = forever(lambda: [(x, y)])

    time_steps(step, batches, args.warmup, preset, cfg.train.seed)
    time_steps(bare, ready, args.warmup, ready_inputs, cfg.train.seed)
    # Two halves each, interleaved, so drift (clocks, other jobs) falls on both alike.
    half = max(1, args.steps // 2)
    timed = {"train": [0, 0.0], "bare": [0, 0.0]}
    for _ in range(2):
        for key, fn, source, inputs in (("train", step, batches, preset), ("bare", bare, ready, ready_inputs)):
            images, seconds = time_steps(fn, source, half, inputs, cfg.train.seed)
            timed[key][0] += images
            timed[key][1] += seconds
    train_rate, bare_rate = (images / seconds for images, seconds in timed.values())
    note(f"steps: train {train_rate:.0f} img/s, model {bare_rate:.0f} img/s")

    run_epoch(step, train, val, plan, args.batch, 0)  # untimed: tunes the last partial batch's shapes
    epoch_times, eval_times = [], []
    for epoch in range(1, args.epochs + 1):
        total, in_eval = run_epoch(step, train, val, plan, args.batch, epoch)
        epoch_times.append(total)
        eval_times.append(in_eval)
        note(f"epoch {epoch}: {total:.2f} s ({in_eval:.2f} s evaluating {len(val)} images)")
    epoch_s = sum(epoch_times) / len(epoch_times)

    emit("train_step_img_per_s", train_rate, 1)
    emit("model_step_img_per_s", bare_rate, 1)
    emit("data_path_fraction", train_rate / bare_rate, 3)
    emit("epoch_img_per_s", len(train) / epoch_s, 1)
    emit("epoch_s", epoch_s, 3)
    emit("eval_img_per_s", len(val) / (sum(eval_times) / len(eval_times)), 1)
    if device.type == "cuda":
        emit("peak_mem_gib", torch.cuda.max_memory_allocated(device) / 2**30, 2)
    emit("image_size", args.size, 0)
    emit("batch_size", args.batch, 0)


if __name__ == "__main__":
    import sys

    from simpsons.cli import run_job

    run_job(main, get_args_parser(), log_stream=sys.stderr)  # stdout holds only the figures
