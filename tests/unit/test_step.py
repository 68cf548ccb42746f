"""The training step and the worker's building blocks, in plain PyTorch on the CPU (no Ray).

What only a GPU can show (real syncs, fused AdamW on CUDA, bf16 support of a real device) is in
test_gpu.py; here each finding is pinned wherever its behaviour exists on the CPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist
from host_reads import HostTensorRecorder
from tiny import ALL_AUGMENTATIONS, random_split, tiny_config

from simpsons.checkpoint import restore, served_weights, training_state
from simpsons.config import Config, load_config
from simpsons.data import CLASS_NAMES, ResidentSplit, mix_seed
from simpsons.engine import TrainStep, amp_dtype, train_one_epoch
from simpsons.model import classify, create_model
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_step, epoch_sides
from simpsons.worker import _TensorBoard

CPU = torch.device("cpu")


_cfg = tiny_config


def _split(n: int = 32, **kwargs) -> ResidentSplit:
    return random_split(n, **kwargs)


def _step(cfg: Config, split: ResidentSplit) -> TrainStep:
    counts = np.bincount(split.labels.numpy(), minlength=len(CLASS_NAMES)).tolist()
    model, criterion, optimizer = build_components(cfg, counts, CPU)
    return create_train_step(
        cfg, model, criterion, optimizer, create_scheduler(optimizer, cfg, split.steps_per_epoch(8))
    )


def _epoch(step: TrainStep, batches, cfg: Config, epoch: int = 0, **kwargs):
    """train_one_epoch at the side the config's plan gives `epoch`."""
    return train_one_epoch(step, batches, Plan.of(cfg, CPU).train_preset(epoch), cfg.train.seed, epoch, **kwargs)


def test_auto_precision_takes_fp16_on_gpus_without_native_bf16(monkeypatch):
    # No GPU here: the device's compute capability is what amp_dtype asks, so it is patched.
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4 (V100: 7.0)
    # torch.cuda.is_bf16_supported() says True on a T4 (emulation); amp_dtype must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100, A10G: (8, 6)
    assert amp_dtype("auto", cuda) == torch.bfloat16
    assert amp_dtype("auto", CPU) == torch.bfloat16
    assert amp_dtype("fp16", CPU) == torch.float16 and amp_dtype("fp32", cuda) is None


def test_recorder_sees_a_tensor_built_from_host_data_on_the_device():
    # The recorder itself must catch the copies a step could make by mistake, such as building the
    # normalisation mean or a batch's image count with torch.tensor(..., device=...).
    with HostTensorRecorder() as recorder:
        torch.tensor((0.485, 0.456, 0.406), device=CPU)
        torch.tensor(float(16), dtype=torch.float64, device=CPU)
    assert len(recorder.found) == 2


@pytest.mark.parametrize(
    "on_device, augmentations",
    [(True, ()), (False, ()), (True, ALL_AUGMENTATIONS)],
    ids=["on_device", "host_memory", "on_device_all_augmentations"],
)
def test_training_step_makes_no_tensor_from_host_data(on_device, augmentations):
    cfg = _cfg(*augmentations)
    split = _split(on_device=on_device)
    step = _step(cfg, split)
    generator = torch.Generator().manual_seed(0)
    batches = split.train_batches(0, 8, seed=0)
    step(
        *next(batches), Plan.of(cfg, CPU).train_preset(0), generator
    )  # the first step fills the per-device caches (normalize's constants)
    recorder = HostTensorRecorder()

    def recorded(batches):  # the batch gathers and train_one_epoch's steps and sums, not its end-of-epoch read
        with recorder:
            yield from batches

    stats = _epoch(step, recorded(batches), cfg)
    assert recorder.found == []
    assert stats.images == 24 and np.isfinite(stats.loss)


def test_dropout_masks_differ_across_ranks_and_repeat_per_rank():
    cfg = _cfg()

    def masks(rank: int, epoch: int = 0) -> torch.Tensor:
        model = create_model(len(CLASS_NAMES), cfg.model.head, cfg.model.dropout).train()
        torch.manual_seed(mix_seed(cfg.train.seed, epoch, rank, 1, 0))  # what train_one_epoch does at step 0
        dropout = next(m for m in model.fc if isinstance(m, torch.nn.Dropout))
        return dropout(torch.ones(64, 512)) == 0

    rank0, rank1 = masks(0), masks(1)
    assert rank0.float().mean().item() == pytest.approx(cfg.model.dropout, abs=0.05)
    assert torch.equal(rank0, masks(0))  # seeded: a restarted worker draws the same
    assert not torch.equal(rank0, rank1) and not torch.equal(rank0, masks(0, epoch=1))
    # The augmentation stream (0) and the dropout stream (1) of every step never share a seed.
    seeds = {mix_seed(0, e, r, s, i) for e in range(3) for r in range(8) for s in range(2) for i in range(500)}
    assert len(seeds) == 3 * 8 * 2 * 500


def test_resume_with_fp16_and_flipped_channels_last():
    split = _split()
    saved_cfg = _cfg("train.precision=bf16", "train.channels_last=true")
    saved = _step(saved_cfg, split)
    generator = torch.Generator().manual_seed(0)
    for images, labels in split.train_batches(0, 8, seed=0):
        saved(images, labels, Plan.of(saved_cfg, CPU).train_preset(0), generator)
    buffer = io.BytesIO()
    torch.save(training_state(saved.model, saved.optimizer, saved.scheduler, saved.scaler), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["scaler"] == {}  # a disabled scaler saves nothing ...
    with pytest.raises(RuntimeError, match="empty"):
        torch.amp.GradScaler("cpu").load_state_dict(state["scaler"])  # ... which an enabled one refuses

    resumed_cfg = _cfg("train.precision=fp16", "train.channels_last=false")
    resumed = _step(resumed_cfg, split)
    assert resumed.scaler.is_enabled()
    restore(state, resumed.model, resumed.optimizer, resumed.scheduler, resumed.scaler)
    conv = resumed.model.conv1[0].weight
    assert state["optimizer"]["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for param, param_state in resumed.optimizer.state.items():  # the layout of this run's parameters
        assert param_state["exp_avg"].stride() == param_state["exp_avg_sq"].stride() == param.stride()
    assert conv.is_contiguous() and torch.equal(conv, saved.model.conv1[0].weight.contiguous())
    preset = Plan.of(resumed_cfg, CPU).train_preset(1)
    losses = [
        float(resumed(images, labels, preset, generator)[0]) for images, labels in split.train_batches(1, 8, seed=0)
    ]
    assert all(np.isfinite(losses)) and resumed.scaler.get_scale() > 0


def test_training_state_is_plain_cpu_tensors():
    step = _step(_cfg(), _split())
    step(*next(_split().train_batches(0, 8, 0)), Plan.of(_cfg(), CPU).train_preset(0), torch.Generator().manual_seed(0))
    state = training_state(step.model, step.optimizer, step.scheduler, step.scaler, epoch=3)
    tensors = [v for v in _walk(state) if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert state["epoch"] == 3 and not any(k.startswith("module.") for k in state["model"])


def _walk(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def _bucket_mib(first_mb: float, cap_mb: float) -> list[float]:
    """The gradient buckets (MiB, in the order backward fills them) that DDP's own function makes."""
    params = list(reversed(list(create_model(len(CLASS_NAMES)).parameters())))  # backward runs last layer first
    buckets, _ = dist._compute_bucket_assignment_by_size(params, [int(first_mb * 2**20), int(cap_mb * 2**20)])
    return [sum(params[i].numel() * 4 for i in bucket) / 2**20 for bucket in buckets]


def test_ddp_bucket_default_leaves_little_all_reduce_after_backward():
    default = _bucket_mib(1, 25)  # DDP's own default: a 1 MiB first bucket, then 25 MiB
    assert len(default) == 2 and default[-1] / sum(default) > 0.7  # the finding
    ours = _bucket_mib(Config().train.ddp_bucket_mb, Config().train.ddp_bucket_mb)
    assert sum(ours) == pytest.approx(11.19, abs=0.01)
    assert len(ours) <= 4 and ours[-1] / sum(ours) <= 0.1


def test_tensorboard_copies_every_n_epochs_and_at_the_end(tmp_path):
    cfg = load_config(None, [f"run.storage={tmp_path}", "run.name=tb", "train.tensorboard_every=2"])
    writer = _TensorBoard(cfg)
    remote = tmp_path / "tb" / "tensorboard"

    def copied() -> int:
        return sum(p.stat().st_size for p in remote.glob("events.out.tfevents.*"))

    writer.scalars({"train_loss": 1.0}, 0)
    assert copied() == 0  # nothing copied after the first epoch
    writer.scalars({"train_loss": 0.9}, 1)
    after_two = copied()
    assert after_two > 0
    writer.scalars({"train_loss": 0.8}, 2)
    assert copied() == after_two
    writer.close()
    assert copied() > after_two  # the last epoch's events arrive at the end


def test_moving_average_follows_the_weights_and_survives_a_checkpoint():
    cfg = _cfg("optim.ema_decay=0.5")
    split = _split()
    step = _step(cfg, split)
    raw = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    expected = dict(raw)
    for images, labels in split.train_batches(0, 8, seed=0):
        step(images, labels, Plan.of(cfg, CPU).train_preset(0), torch.Generator().manual_seed(0))
        current = dict(step.model.named_parameters())
        # The first update copies the weights; each later one moves halfway (decay 0.5) towards them.
        first = int(step.ema.n_averaged) == 1
        expected = {
            n: current[n].detach().clone() if first else 0.5 * expected[n] + 0.5 * current[n].detach() for n in expected
        }
    averaged = dict(step.ema.module.named_parameters())
    assert all(torch.allclose(averaged[n], expected[n], atol=1e-6) for n in expected)
    assert not torch.equal(averaged["fc.4.weight"], step.model.fc[4].weight)

    state = training_state(step.model, step.optimizer, step.scheduler, step.scaler, step.ema, epoch=0)
    resumed = _step(cfg, split)
    restore(state, resumed.model, resumed.optimizer, resumed.scheduler, resumed.scaler, resumed.ema)
    assert int(resumed.ema.n_averaged) == int(step.ema.n_averaged) == 4
    assert torch.equal(resumed.ema.module.fc[4].weight, step.ema.module.fc[4].weight)
    assert torch.equal(served_weights(state)["fc.4.weight"], step.ema.module.fc[4].weight)


def test_test_time_flip_averages_the_logits_of_the_image_and_its_mirror():
    model = create_model(len(CLASS_NAMES)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        both = classify(model, x, flip=True)
        assert torch.allclose(both, (model(x) + model(x.flip(3))) / 2)
        symmetric = torch.cat([x[..., :16], x[..., :16].flip(3)], dim=3)  # its own mirror image
        assert torch.allclose(classify(model, symmetric, flip=True), model(symmetric), atol=1e-5)
        assert not torch.allclose(both, model(x))


def test_progressive_resizing_schedule():
    # Off: every epoch at train_size.
    cfg = load_config(None, ["data.train_size=64", "data.stored_size=72", "optim.epochs=14", "data.resize_from=1"])
    assert set(epoch_sides(cfg)) == {64}
    cfg = load_config(None, ["data.train_size=64", "data.stored_size=72", "optim.epochs=14", "data.resize_from=0.625"])
    sizes = list(epoch_sides(cfg))
    # Min size up to 40 % of the run, train_size from 85 %, in multiples of 8 and never shrinking.
    assert sizes[:6] == [40] * 6 and sizes[-2:] == [64, 64]
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes) and len(set(sizes)) >= 4
    one = load_config(None, ["data.train_size=64", "data.stored_size=72", "optim.epochs=1", "data.resize_from=0.625"])
    assert epoch_sides(one) == (40,)  # a one-epoch run is all ramp start


def test_each_epoch_trains_at_its_side_and_evaluation_stays_at_train_size():
    split = _split()
    cfg = _cfg("optim.epochs=3", "data.resize_from=0.5", "data.resize_ramp=[0.0, 1.0]", "train.precision=fp32")
    step = _step(cfg, split)
    seen = []
    step.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    for epoch in range(3):
        _epoch(step, split.train_batches(epoch, 8, 0), cfg, epoch)
    assert seen == [16] * 4 + [24] * 4 + [32] * 4  # 32 images, batch 8, sides 16 -> 24 -> 32
