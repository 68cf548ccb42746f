"""The CUDA path on a real GPU: precision choice, sync-free steps and evaluation, placement, resume,
the exported model, a Ray Train run, inference.

Skipped without CUDA. `make device-check` (bench/device_check.py) runs this file as a subprocess on
a bare GPU machine: everything here but the Ray Train run (skipped without Ray, and without the real
sample's archive) needs torch, numpy and pytest alone.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ALL_AUGMENTATIONS

from simpsons.checkpoint import restore, training_state
from simpsons.config import load_config
from simpsons.data import CLASS_NAMES, ResidentSplit, data_placement
from simpsons.dataset import load_packed
from simpsons.engine import amp_dtype, evaluate, train_one_epoch
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_preset, create_train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]

BENCH = Path(__file__).resolve().parents[2] / "bench"
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _no_sync_checks_left_on():
    yield
    torch.cuda.set_sync_debug_mode(0)  # also after a failure inside a checked region


@pytest.fixture(scope="module")
def real_sample() -> tuple[Path, Path]:
    """(the real sample's image tree, its packed arrays at 144 px), cached in bench/out/cache."""
    sys.path.insert(0, str(BENCH))
    from common import DEFAULT_CACHE, packed, real_sample_tree

    tree = real_sample_tree(DEFAULT_CACHE)
    if tree is None:
        pytest.skip("the real sample ../shared/data/simpsons_dataset/dataset.tar.xz is not here")
    return tree, packed(tree, DEFAULT_CACHE, 144)


def _cfg(*overrides: str):
    return load_config(None, ["data.stored_size=144", "data.train_size=128", "optim.batch_size=128", *overrides])


PRESET = create_train_preset(_cfg())  # every step here at 128 px


def _components(cfg, labels: np.ndarray):
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    model, criterion, optimizer = build_components(cfg, counts, CUDA)
    return create_train_step(cfg, model, criterion, optimizer, create_scheduler(optimizer, cfg, 10))


def _random_arrays(n: int = 512, size: int = 144):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, len(CLASS_NAMES), n)


def test_precision_choice_on_this_gpu():
    major, minor = torch.cuda.get_device_capability(CUDA)
    expected = torch.bfloat16 if major >= 8 else torch.float16
    assert amp_dtype("auto", CUDA) == expected, f"{torch.cuda.get_device_name(CUDA)} is sm{major}{minor}"
    images, labels = _random_arrays(256)
    step = _components(_cfg(), labels)
    assert step.dtype == expected and step.scaler.is_enabled() == (expected == torch.float16)
    split = ResidentSplit(images, labels, device=CUDA)
    losses = [
        float(step(x, y, PRESET, torch.Generator(device=CUDA).manual_seed(0))[0])
        for x, y in split.train_batches(0, 128, 0)
    ]
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("ema", [0.0, 0.999])
@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("on_device", [True, False])
def test_training_step_never_waits_for_the_gpu(precision, on_device, ema):
    torch.backends.cudnn.benchmark = True
    images, labels = _random_arrays()
    split = ResidentSplit(images, labels, device=CUDA, on_device=on_device)
    step = _components(_cfg(f"train.precision={precision}", f"optim.ema_decay={ema}"), labels)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    batches = split.train_batches(0, 128, seed=0)
    for _ in range(2):  # warm-up: cudnn.benchmark's tuning, normalize's constants, the scaler's state
        step(*next(batches), PRESET, generator)
    torch.cuda.synchronize()

    def unsynced(batches):  # the batch gathers and train_one_epoch's steps and sums, not its end-of-epoch read
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call in between raises
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode(0)

    # log_every=1: rank 0's progress line, every step, must not wait either
    stats = train_one_epoch(step, unsynced(batches), PRESET, seed=0, epoch=0, log_every=1, log_label="sync audit")
    assert stats.images == 256 and math.isfinite(stats.loss)


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_steps_with_every_augmentation_on_never_wait_for_the_gpu(precision):
    images, labels = _random_arrays()
    split = ResidentSplit(images, labels, device=CUDA)
    cfg = _cfg(f"train.precision={precision}", *ALL_AUGMENTATIONS)
    preset = create_train_preset(cfg)
    step = _components(cfg, labels)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    batches = split.train_batches(0, 128, seed=0)
    step(*next(batches), preset, generator)  # warm-up: the augmentations' constants
    torch.cuda.synchronize()

    def unsynced(batches):  # the steps, not the end-of-epoch read
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode(0)

    stats = train_one_epoch(step, unsynced(batches), preset, seed=0, epoch=0)
    assert stats.images == 512 - 128 and math.isfinite(stats.loss)


@pytest.mark.parametrize("on_device", [True, False])
def test_an_epochs_batches_never_wait_for_the_gpu_from_its_first(on_device):
    # The epoch's permutation goes to the GPU through pinned memory: a pageable copy is a sync.
    images, labels = _random_arrays(300)
    split = ResidentSplit(images, labels, device=CUDA, on_device=on_device)
    list(split.train_batches(0, 128, 0))  # warm-up: the pinned allocator's first blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(split.train_batches(1, 128, 0, drop_last=True))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [len(y) for _, y in batches] == [128, 128] and all(x.is_cuda for x, _ in batches)


class _Unsynced:
    """A split whose evaluation batches, and the loop bodies between them, run in sync debug mode "error"."""

    def __init__(self, split):
        self.split = split

    def eval_batches(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from self.split.eval_batches(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("on_device", [True, False])
def test_evaluation_never_waits_for_the_gpu_between_batches(on_device):
    images, labels = _random_arrays(300)  # batches of 128, 128 and 44 padded to 128
    split = ResidentSplit(images, labels, device=CUDA, on_device=on_device)
    cfg = _cfg("optim.ema_decay=0.999")
    step = _components(cfg, labels)
    plan = Plan.of(cfg, CUDA)
    evaluate(step.model, step.criterion, split, plan.eval, plan.dtype, 128, 42)  # warm-up: cuDNN, constants
    for model in (step.model, step.ema):
        cm, loss = evaluate(model, step.criterion, _Unsynced(split), plan.eval, plan.dtype, 128, 42, pad_last=True)
        assert int(cm.sum()) == 300 and math.isfinite(loss)


def test_exported_model_runs_on_the_gpu_and_agrees_with_the_cpu(tmp_path):
    from simpsons.deploy import export_model, load_exported
    from simpsons.inference import load_classifier
    from simpsons.model import create_model

    cfg = _cfg()
    torch.manual_seed(0)
    path = export_model(create_model(42).eval(), cfg, list(CLASS_NAMES), tmp_path / "model.pt2")
    module, _ = load_exported(path, CUDA)
    assert {t.device for t in module.state_dict().values()} == {CUDA}
    images, _ = _random_arrays(20)
    on_gpu = load_classifier(path, "cuda")
    assert on_gpu.device.type == "cuda"
    expected = load_classifier(path, "cpu").probabilities(images)
    assert torch.allclose(on_gpu.probabilities(images), expected, atol=1e-3)


def test_host_memory_path_gives_the_resident_batches_on_the_gpu():
    images, labels = _random_arrays(300, 48)
    resident = ResidentSplit(images, labels, device=CUDA)
    host = ResidentSplit(images, labels, device=CUDA, on_device=False)
    assert resident.images.is_cuda and not host.images.is_pinned()  # the split stays pageable
    for (x, y), (hx, hy) in zip(resident.train_batches(1, 64, 3, 1, 2), host.train_batches(1, 64, 3, 1, 2)):
        assert hx.is_cuda and torch.equal(x, hx) and torch.equal(y, hy)
    free, _ = torch.cuda.mem_get_info(CUDA)
    assert data_placement(int(free * 0.4), CUDA, 0.5)[0] and not data_placement(int(free * 0.6), CUDA, 0.5)[0]


def test_resume_on_cuda_with_fused_adamw_fp16_and_flipped_layout():
    images, labels = _random_arrays(256)
    split = ResidentSplit(images, labels, device=CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    saved = _components(_cfg("train.precision=bf16", "train.channels_last=true"), labels)
    for x, y in split.train_batches(0, 128, 0):
        saved(x, y, PRESET, generator)
    buffer = io.BytesIO()
    torch.save(training_state(saved.model, saved.optimizer, saved.scheduler, saved.scaler), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # no map_location: CPU tensors only
    assert all(t.device.type == "cpu" for t in state["model"].values())
    resumed = _components(_cfg("train.precision=fp16", "train.channels_last=false"), labels)
    assert resumed.optimizer.defaults["fused"]
    restore(state, resumed.model, resumed.optimizer, resumed.scheduler, resumed.scaler)
    losses = [float(resumed(x, y, PRESET, generator)[0]) for x, y in split.train_batches(1, 128, 0)]
    assert all(np.isfinite(losses))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (a bare GPU machine)")
def test_ray_train_on_the_real_sample_resumes_then_evaluates_and_predicts_on_the_gpu(
    ray_cluster, real_sample, tmp_path
):
    from simpsons.driver import fit
    from simpsons.inference import evaluate_folder, load_checkpoint, predict_files

    tree, dataset = real_sample
    overrides = [
        "data.stored_size=144",
        "data.train_size=128",
        "optim.batch_size=64",
        "train.workers=1",
        "train.use_gpu=true",
        "train.cpus_per_worker=2",
        "train.histogram_every=0",
        "train.log_every=0",
        f"run.storage={tmp_path}",
        "run.name=gpu",
    ]
    fit(load_config(None, overrides + ["optim.epochs=1"]), str(dataset))
    report = fit(load_config(None, overrides + ["optim.epochs=2"]), str(dataset))  # the same run, one more epoch
    best = tmp_path / "gpu" / "best"
    history = json.loads((best / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1] and [h["resumed"] for h in history] == [False, True]
    assert report["accuracy"] >= 0.2, report["accuracy"]  # 42 classes; the largest is ~11 % of val
    state = torch.load(best / "checkpoint.pt", weights_only=True)  # on any machine: no map_location needed
    assert all(t.device.type == "cpu" for t in state["model"].values())

    model, *_ = load_checkpoint(best)
    assert next(model.parameters()).is_cuda  # the default device is the GPU when there is one
    val = tree / "dataset" / "val" if (tree / "dataset").is_dir() else tree / "val"
    gpu_report, _, _ = evaluate_folder(best, val, workers=8)
    assert gpu_report["images"] == len(load_packed(dataset, "val")[1])
    assert abs(gpu_report["accuracy"] - report["accuracy"]) < 0.02  # same images, same weights
    files = sorted(val.rglob("*.jpg"))[:64]
    on_gpu = predict_files(best, files, top_k=1)
    on_cpu = predict_files(best, files, top_k=1, device="cpu")
    agree = np.mean([a["top"][0]["label"] == b["top"][0]["label"] for a, b in zip(on_gpu, on_cpu)])
    assert agree >= 0.95
