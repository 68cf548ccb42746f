"""The device check: every figure the first GPU run must bring back, on a bare GPU machine, in minutes.

    python bench/device_check.py --make-sample   # once, where the real sample is: bench/out/device_sample.npz
    python bench/device_check.py                 # on the GPU machine (make device-check)
    python bench/device_check.py --quick         # the same code path on the CPU, tiny: a wiring check

The GPU machine has Python 3.12, torch (2.11 or 2.14) + torchvision, numpy, PIL, pyyaml,
tensorboard and pytest; no Ray, boto3, pyarrow or tqdm, no network, and nothing is installed:
this script imports only the training engine (simpsons.engine), the recipe, the model,
augmentation, data placement, metrics, loss and checkpoint (tests/integration/test_bench.py runs --quick with
those packages blocked). What travels there: the tree and bench/out/device_sample.npz (the real
sample's JPEG bytes, up to 60 training and 15 validation images per class, about 25 MB: decoded
as packing decodes them); the speed figures use synthetic uint8 images resident on the GPU.

Figures on stdout, one a line (`name value`), and in a JSON file whose path goes to stderr at
the end (--json, default bench/out/device_check.json, with the device, torch and notes). Every
step is timed at --size px (128), bf16 autocast (the config's "auto"), channels_last, fused
AdamW, cudnn.benchmark, data resident on the GPU:

  step_img_per_s_bB, step_ema_img_per_s_bB   the full training step (batch gather, augmentation,
                                             forward/backward/step, the epoch's sums) at per-GPU
                                             batch B = 64, 256, 512; EMA off and on
  model_step_img_per_s_bB, data_path_fraction_bB, peak_mem_gib_bB
                                             the same step on a ready input tensor; step / model step
  compiled_step_img_per_s_b256, compile_speedup_b256, compile_s
                                             train.compile=true (nn.Module.compile) against off
  epoch_train_s, epoch_evaluate_s, epoch_checkpoint_s, epoch_img_per_s, eval_img_per_s
                                             one epoch of the real sample as the worker runs it
  sync_free_train_epoch_ema, sync_free_evaluate
                                             1 when torch.cuda.set_sync_debug_mode("error") saw no
                                             sync over a training epoch with EMA on (progress line
                                             every step) / over evaluate (EMA weights), else 0
  ddp_bf16_img_per_s, ddp_fp16_img_per_s, ddp_steps_finite
                                             a one-GPU NCCL DistributedDataParallel step (world size
                                             1, tcp://127.0.0.1 store, recipe.ddp_options), bf16 and
                                             fp16 + GradScaler, channels_last, fused AdamW
  gpu_tests_passed, gpu_tests_failed, gpu_tests_skipped
                                             `pytest tests/gpu/test_gpu.py -m gpu` as a subprocess
  device_check_s                             the whole run

Time on one H100 (estimated, not yet measured): speed figures ~1 min (cuDNN tuning included),
compile ~1.5-3 min, epoch and audits ~0.5 min, DDP ~0.5 min, the gpu tests ~1-2 min (their
own limit: what is left of --limit-s, at least 60 s): about 4-7 minutes, within the 8 minutes
asked. Without CUDA (and without --quick) it prints one line `skipped ...` and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from common import REAL_ARCHIVE, REPO, ReadyInputs, emit, forever, note, skip

from simpsons.config import ConfigError, load_config
from simpsons.data import DataError, ResidentSplit, data_placement, load_image
from simpsons.engine import evaluate, synchronize, train_one_epoch
from simpsons.names import CLASS_NAMES
from simpsons.recipe import (
    Plan,
    build_components,
    create_scheduler,
    create_train_preset,
    create_train_step,
    ddp_options,
)

SAMPLE = REPO / "bench" / "out" / "device_sample.npz"
SAMPLE_LIMIT = 48 * 2**20  # what may travel to the GPU machine besides the tree
PER_CLASS = {"train": 60, "val": 15}
BATCHES = (64, 256, 512)
SYNTHETIC_IMAGES = 2048  # resident uint8 images the speed figures draw their batches from


# ---------------------------------------------------------------------------------------------
# The sample: the real sample's JPEG bytes, a subset, in one numpy file (no pickle)


def make_sample(archive: Path, out: Path) -> None:
    """Up to PER_CLASS images per class and split of the real sample's archive, as their JPEG bytes."""
    if not archive.is_file():
        raise SystemExit(f"error: the real sample {archive} is not here; pass --archive <dataset.tar.xz>.")
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    kept: dict[str, list[tuple[bytes, int]]] = {"train": [], "val": []}
    counts: dict[tuple[str, int], int] = {}
    with tarfile.open(archive, "r|*") as tar:  # one streaming pass
        for member in tar:
            parts = Path(member.name).parts  # dataset/<split>/<class>/<file>
            if not member.isfile() or len(parts) < 3 or parts[-3] not in kept or parts[-2] not in index:
                continue
            split, label = parts[-3], index[parts[-2]]
            if counts.get((split, label), 0) < PER_CLASS[split]:
                counts[(split, label)] = counts.get((split, label), 0) + 1
                kept[split].append((tar.extractfile(member).read(), label))
    arrays = {}
    for split, items in kept.items():
        blobs = [b for b, _ in items]
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array([label for _, label in items], dtype=np.int16)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    size = out.stat().st_size
    if size > SAMPLE_LIMIT:
        out.unlink()
        raise SystemExit(f"error: the sample would be {size / 2**20:.1f} MiB, over {SAMPLE_LIMIT / 2**20:.0f} MiB.")
    note(f"wrote {out} ({size / 2**20:.1f} MiB): {len(kept['train'])} train, {len(kept['val'])} val images")


def load_sample(path: Path, stored: int) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{split: (images (N, S, S, 3) uint8, labels (N,))} decoded as packing decodes them, or None."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        splits = {}
        for split in ("train", "val"):
            data, offsets = f[f"{split}_bytes"].tobytes(), f[f"{split}_offsets"]
            images = np.stack([load_image(data[a:b], stored) for a, b in itertools.pairwise(offsets)])
            splits[split] = (images, f[f"{split}_labels"].astype(np.int64))
    return splits


def synthetic(n: int, stored: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, stored, stored, 3), dtype=np.uint8), rng.integers(0, len(CLASS_NAMES), n)


# ---------------------------------------------------------------------------------------------
# Measurements


class Check:
    """The run's settings, figures and notes."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.figures: dict[str, float] = {}
        self.notes: list[str] = []
        self.base = [f"data.train_size={args.size}", f"data.stored_size={args.stored}", *args.set]

    def cfg(self, batch: int, *overrides: str):
        return load_config(None, [*self.base, f"optim.batch_size={batch}", f"train.eval_batch={batch}", *overrides])

    def emit(self, name: str, value: float, digits: int = 2) -> None:
        self.figures[name] = round(float(value), digits)
        emit(name, value, digits)

    def note(self, message: str) -> None:
        self.notes.append(message)
        note(message)

    def step(self, cfg, steps_per_epoch: int = 10, prepare=lambda m: m):
        model, criterion, optimizer = build_components(cfg, [1] * len(CLASS_NAMES), self.device, prepare)
        scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
        return create_train_step(cfg, model, criterion, optimizer, scheduler)


def epochs_of(split: ResidentSplit, batch: int):
    """One full-batch epoch of `split` after another, forever."""
    counter = itertools.count()
    return forever(lambda: split.train_batches(next(counter), batch, 0, drop_last=True))


def timed(step, batches, steps: int, preset, seed: int = 0) -> tuple[int, float]:
    """(images, seconds) of `steps` steps of train_one_epoch, from an idle device to an idle device."""
    synchronize(step.device)
    trained = train_one_epoch(step, itertools.islice(batches, steps), preset, seed, epoch=0)
    return trained.images, trained.seconds


def speed(check: Check, split: ResidentSplit) -> None:
    """The full step, EMA off and on, and the bare model step, at each per-GPU batch."""
    a, device = check.args, check.device
    for batch in a.batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = check.cfg(batch)
        preset = create_train_preset(cfg, a.size)
        pipelines = {
            "step": (check.step(cfg), preset, None),
            "step_ema": (check.step(check.cfg(batch, "optim.ema_decay=0.999")), preset, None),
            "model_step": (check.step(cfg), ReadyInputs(a.size), None),
        }
        x = torch.randn(batch, 3, a.size, a.size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, len(CLASS_NAMES), (batch,), device=device)
        sources = {"step": epochs_of(split, batch), "model_step": forever(lambda x=x, y=y: [(x, y)])}
        sources["step_ema"] = sources["step"]
        for name, (step, inputs, _) in pipelines.items():
            timed(step, sources[name], a.warmup, inputs)
        rates = dict.fromkeys(pipelines, (0, 0.0))
        for _ in range(2):  # two halves each, interleaved: drift falls on all alike
            for name, (step, inputs, _) in pipelines.items():
                images, seconds = timed(step, sources[name], max(1, a.steps // 2), inputs)
                rates[name] = (rates[name][0] + images, rates[name][1] + seconds)
        rate = {name: images / seconds for name, (images, seconds) in rates.items()}
        for name in pipelines:
            check.emit(f"{name}_img_per_s_b{batch}", rate[name], 1)
        check.emit(f"data_path_fraction_b{batch}", rate["step"] / rate["model_step"], 3)
        if device.type == "cuda":
            check.emit(f"peak_mem_gib_b{batch}", torch.cuda.max_memory_allocated(device) / 2**30, 2)
        del pipelines, sources


def compiled(check: Check, split: ResidentSplit) -> None:
    """train.compile on against off at batch 256 (the one in the middle), compile time apart."""
    a = check.args
    batch = a.batches[len(a.batches) // 2]
    batches = epochs_of(split, batch)
    preset = create_train_preset(check.cfg(batch), a.size)
    plain, fast = check.step(check.cfg(batch)), check.step(check.cfg(batch, "train.compile=true"))
    timed(plain, batches, a.warmup, preset)
    started = time.perf_counter()
    timed(fast, batches, 3, preset)  # compiles forward and backward
    check.emit("compile_s", time.perf_counter() - started, 1)
    timed(fast, batches, a.warmup, preset)
    rates = {}
    for name, step in (("plain", plain), ("compiled", fast)):
        images, seconds = timed(step, batches, a.steps, preset)
        rates[name] = images / seconds
    check.emit(f"compiled_step_img_per_s_b{batch}", rates["compiled"], 1)
    check.emit(f"compile_speedup_b{batch}", rates["compiled"] / rates["plain"], 3)


def epoch_split(check: Check, train: ResidentSplit, val: ResidentSplit) -> None:
    """One epoch as the worker runs it: train, evaluate (the EMA weights, as served), checkpoint."""
    from simpsons.checkpoint import save, training_state

    a = check.args
    batch = min(a.batches[len(a.batches) // 2], len(train))
    cfg = check.cfg(batch, "optim.ema_decay=0.999", "optim.epochs=2")
    step = check.step(cfg, train.steps_per_epoch(batch, drop_last=True))
    plan = Plan.of(cfg, check.device)
    preset = create_train_preset(cfg, a.size)

    def one_epoch(epoch: int) -> tuple[float, float, float]:
        synchronize(check.device)
        started = time.perf_counter()
        train_one_epoch(step, train.train_batches(epoch, batch, 0, drop_last=True), preset, 0, epoch)
        trained = time.perf_counter()
        for model in (step.model, step.ema):  # the worker evaluates both: raw_val_* and the served weights
            cm, _ = evaluate(model, step.criterion, val, plan.eval, plan.dtype, plan.eval_batch, len(CLASS_NAMES),
                               pad_last=plan.pad_eval)  # fmt: skip
        evaluated = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            state = training_state(step.model, step.optimizer, step.scheduler, step.scaler, step.ema, epoch=epoch)
            save(folder, state, {"epoch": epoch, "confusion": cm.cpu().tolist()})
        return trained - started, evaluated - trained, time.perf_counter() - evaluated

    one_epoch(0)  # untimed: cuDNN's tuning for these shapes
    train_s, eval_s, checkpoint_s = one_epoch(1)
    check.emit("epoch_train_s", train_s, 3)
    check.emit("epoch_evaluate_s", eval_s, 3)
    check.emit("epoch_checkpoint_s", checkpoint_s, 3)
    check.emit("epoch_img_per_s", train.steps_per_epoch(batch, drop_last=True) * batch / train_s, 1)
    check.emit("eval_img_per_s", 2 * len(val) / eval_s, 1)


class _Unsynced:
    """A split whose batches, and the loop bodies between them, run in sync debug mode "error"."""

    def __init__(self, split: ResidentSplit):
        self.split = split

    def _audited(self, batches):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def train_batches(self, *args, **kwargs):
        return self._audited(self.split.train_batches(*args, **kwargs))

    def eval_batches(self, *args, **kwargs):
        return self._audited(self.split.eval_batches(*args, **kwargs))


def sync_audit(check: Check, train: ResidentSplit, val: ResidentSplit) -> None:
    """A training epoch with EMA on and rank 0's progress line every step, then evaluate, with any
    call that makes the host wait for the GPU raising."""
    batch = min(64, len(train))
    cfg = check.cfg(batch, "optim.ema_decay=0.999")
    step = check.step(cfg, train.steps_per_epoch(batch, drop_last=True))
    plan = Plan.of(cfg, check.device)
    preset = create_train_preset(cfg, check.args.size)
    train_one_epoch(step, itertools.islice(train.train_batches(0, batch, 0), 2), preset, 0, 0)  # warm-up
    evaluate(step.ema, step.criterion, val, plan.eval, plan.dtype, plan.eval_batch, len(CLASS_NAMES), pad_last=True)
    synchronize(check.device)
    audited = _Unsynced(train)
    for name, run in (
        ("sync_free_train_epoch_ema", lambda: train_one_epoch(
            step, audited.train_batches(1, batch, 0, drop_last=True), preset, 0, 1, log_every=1, log_label="audit")),
        ("sync_free_evaluate", lambda: evaluate(
            step.ema, step.criterion, _Unsynced(val), plan.eval, plan.dtype, plan.eval_batch, len(CLASS_NAMES),
            pad_last=True)),
    ):  # fmt: skip
        try:
            run()
            check.emit(name, 1, 0)
        except RuntimeError as exc:
            check.note(f"{name}: a sync: {str(exc).splitlines()[0]}")
            check.emit(name, 0, 0)


def ddp_steps(check: Check, split: ResidentSplit) -> None:
    """A one-process DistributedDataParallel run (NCCL on a GPU, gloo on the CPU) in bf16 and fp16."""
    import torch.distributed as dist

    a, device = check.args, check.device
    batch = 4 if a.quick else min(256, len(split))  # fp16 on the CPU: seconds per image
    steps, warmup = (1, 0) if a.quick else (a.steps, a.warmup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    finite = True
    try:
        for precision in ("bf16", "fp16"):
            cfg = check.cfg(batch, f"train.precision={precision}", "train.channels_last=true")
            kwargs = {**ddp_options(cfg), **({"device_ids": [device]} if device.type == "cuda" else {})}
            step = check.step(cfg, prepare=lambda m, kw=kwargs: torch.nn.parallel.DistributedDataParallel(m, **kw))
            batches = epochs_of(split, batch)
            preset = create_train_preset(cfg, a.size)
            timed(step, batches, warmup, preset)
            synchronize(device)
            trained = train_one_epoch(step, itertools.islice(batches, steps), preset, 0, 0)
            finite &= math.isfinite(trained.loss)
            check.emit(f"ddp_{precision}_img_per_s", trained.images_per_s, 1)
            fused = step.optimizer.defaults.get("fused")
            check.note(f"ddp {precision}: {backend}, scaler {step.scaler.is_enabled()}, fused AdamW {fused}")
    finally:
        dist.destroy_process_group()
    check.emit("ddp_steps_finite", int(finite), 0)


def gpu_tests(check: Check, limit_s: float) -> None:
    """(passed, failed, skipped) of `pytest tests/gpu/test_gpu.py -m gpu`; errors and timeouts fail."""
    with tempfile.TemporaryDirectory() as tmp:
        report = f"{tmp}/junit.xml"
        command = [sys.executable, "-m", "pytest", "tests/gpu/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}"]  # fmt: skip
        try:
            subprocess.run(command, cwd=REPO, stdout=sys.stderr, timeout=limit_s)
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        except (subprocess.TimeoutExpired, FileNotFoundError, ET.ParseError) as exc:
            check.note(f"the gpu tests did not finish: {exc}")
            total, failed, errors, skipped = 1, 1, 0, 0
    check.emit("gpu_tests_passed", total - failed - errors - skipped, 0)
    check.emit("gpu_tests_failed", failed + errors, 0)
    check.emit("gpu_tests_skipped", skipped, 0)


# ---------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-sample", action="store_true", help=f"write {SAMPLE.relative_to(REPO)} and exit")
    parser.add_argument("--archive", type=Path, default=REAL_ARCHIVE, help="the real sample (default: %(default)s)")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the sample file (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "device_check.json")
    parser.add_argument("--quick", action="store_true", help="the CPU code path, tiny: 32 px, batches 8 and 16")
    parser.add_argument("--size", type=int, default=128, help="training side in px (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per figure (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per figure (default: %(default)s)")
    parser.add_argument("--limit-s", type=float, default=450, help="whole-run budget the tests' limit comes from")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile figures")
    parser.add_argument("--no-tests", action="store_true", help="leave out the gpu tests")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return parser


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.make_sample:
        make_sample(args.archive, args.sample)
        return 0
    if args.quick:
        device = torch.device("cpu")
        args.size, args.warmup, args.steps, args.batches = 32, 1, 2, (8, 16)
        args.no_compile = True  # minutes on the CPU; the GPU run measures it
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        skip(
            "device check: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU, or pass --quick to check the code path on the CPU."
        )
    else:
        device, args.batches = torch.device("cuda", 0), BATCHES
        torch.backends.cudnn.benchmark = True  # as the worker does
    args.stored = max(args.size, round(args.size * 144 / 128))
    check = Check(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (code-path check only)"
    check.note(f"device check on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPUs")

    fake_n = 64 if args.quick else SYNTHETIC_IMAGES
    fake = ResidentSplit(*synthetic(fake_n, args.stored), device=device)
    sample = None if args.quick else load_sample(args.sample, args.stored)
    if sample is None:
        check.note(f"no {args.sample} here (make it with --make-sample): the epoch figures use synthetic images")
        sample = {"train": synthetic(48 if args.quick else 2400, args.stored, 1), "val": synthetic(20, args.stored, 2)}
    nbytes = sum(a.nbytes for pair in sample.values() for a in pair)
    on_device, placement = data_placement(nbytes, device, 0.5)
    check.note(f"epoch data: {len(sample['train'][1])} train, {len(sample['val'][1])} val, {placement}")
    train, val = (ResidentSplit(*sample[s], device=device, on_device=on_device) for s in ("train", "val"))

    phases = [("speed", speed, (fake,)), ("epoch", epoch_split, (train, val))]
    phases += [("sync audit", sync_audit, (train, val))] if device.type == "cuda" else []
    phases += [("ddp", ddp_steps, (fake,))]
    phases += [] if args.no_compile else [("compile", compiled, (fake,))]
    for phase, run, inputs in phases:
        began = time.perf_counter()
        run(check, *inputs)
        check.note(f"{phase}: {time.perf_counter() - began:.1f} s")
    if not args.no_tests:
        gpu_tests(check, max(60.0, args.limit_s - (time.perf_counter() - started)))
    check.emit("device_check_s", time.perf_counter() - started, 1)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "figures": check.figures,
               "notes": check.notes, "argv": sys.argv[1:]}  # fmt: skip
    args.json.write_text(json.dumps(payload, indent=1))
    note(f"figures written to {args.json}")
    failed = check.figures.get("gpu_tests_failed", 0) or not check.figures.get("ddp_steps_finite", 1)
    return 1 if failed else 0


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        sys.exit(main(arguments))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
