"""The GPU path's fixes where the CPU can show them: evaluation without reads of the device, DDP
without per-forward buffer broadcasts, a progress line that does not wait, one training shape per
epoch, evaluation every N epochs, compile in place, and AdamW's groups. Each has a `gpu`-marked
counterpart in test_gpu.py where only a GPU shows the behaviour."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from host_reads import HostTensorRecorder
from tiny import random_split, tiny_config

from simpsons.config import Config
from simpsons.data import CLASS_NAMES, ResidentSplit
from simpsons.engine import LaggedValue, MovingAverage, evaluate, loss_text, train_one_epoch
from simpsons.model import create_model
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_step, ddp_options, parameter_groups

CPU = torch.device("cpu")


_cfg = tiny_config


def _split(n: int = 30, **kwargs) -> ResidentSplit:
    return random_split(n, **kwargs)


def _step(cfg: Config, prepare=lambda m: m):
    model, criterion, optimizer = build_components(cfg, [1] * len(CLASS_NAMES), CPU, prepare)
    return create_train_step(cfg, model, criterion, optimizer, create_scheduler(optimizer, cfg, 4))


class _Recorded:
    """A split whose evaluation batches are served, and the loop bodies run, under `recorder`."""

    def __init__(self, split: ResidentSplit, recorder: HostTensorRecorder):
        self.split, self.recorder = split, recorder

    def eval_batches(self, *args):
        with self.recorder:
            yield from self.split.eval_batches(*args)


def test_recorder_sees_bincount_the_confusion_matrix_used_to_read_back():
    with HostTensorRecorder() as recorder:
        torch.bincount(torch.tensor([1, 2]), minlength=9)
    assert any("bincount" in found for found in recorder.found)


@pytest.mark.parametrize("on_device", [True, False])
def test_evaluation_reads_nothing_back_per_batch_and_pads_the_last_batch(on_device):
    cfg = _cfg("optim.ema_decay=0.9", "train.eval_batch=8")
    step, split = _step(cfg), _split(on_device=on_device)  # 30 images: batches of 8, 8, 8 and 6 padded to 8
    plan = Plan.of(cfg, CPU)
    # Unpadded (one batch of all 30) and unrecorded: it also fills the per-device caches (normalize's constants).
    unpadded, unpadded_loss = evaluate(step.model, step.criterion, split, plan.eval, plan.dtype, 30, 42)
    shapes = []
    hook = step.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    recorder = HostTensorRecorder()
    cm, loss = evaluate(
        step.model, step.criterion, _Recorded(split, recorder), plan.eval, plan.dtype, 8, 42, pad_last=True
    )
    hook.remove()
    assert recorder.found == []
    assert set(shapes) == {(8, 3, 32, 32)} and len(shapes) == 4  # one shape: the padded last batch too
    assert int(cm.sum()) == 30 and np.isfinite(loss)  # the padding is not counted
    assert torch.equal(cm, unpadded) and loss == pytest.approx(unpadded_loss, rel=1e-4)
    # The moving average (EMA on) alike.
    recorder = HostTensorRecorder()
    evaluate(step.ema, step.criterion, _Recorded(split, recorder), plan.eval, plan.dtype, 8, 42, pad_last=True)
    assert recorder.found == []


def test_moving_average_updates_never_read_their_counter():
    model = create_model(len(CLASS_NAMES))
    ours = MovingAverage(model, 0.9)
    theirs = torch.optim.swa_utils.AveragedModel(  # torch's, as the step used to build it
        model, device=CPU, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    for average in (ours, theirs):
        average.update_parameters(model)  # the first: copies (ours reads its counter here, once)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    reads = {}
    for name, average in (("ours", ours), ("theirs", theirs)):
        with HostTensorRecorder(also=("_local_scalar_dense",)) as recorder:
            average.update_parameters(model)
        reads[name] = recorder.found
    assert reads["ours"] == [] and len(reads["theirs"]) >= 2  # bool(n == 0), n > 0: two syncs a step on a GPU
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 2
    for mine, torchs in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(mine, torchs)  # the same average


def test_progress_line_shows_a_loss_already_on_the_host():
    lagged = LaggedValue(CPU)
    assert lagged.swap(torch.tensor(2.5), 20) == (20, 2.5)  # the CPU's copy is done at once
    assert loss_text((20, 2.5), 20) == "2.500" and loss_text((20, 2.5), 40) == "2.500 (at step 20)"
    assert loss_text(None, 20) == "pending"


def test_progress_logging_makes_no_tensor_from_host_data(caplog):
    cfg = _cfg()
    step, split = _step(cfg), _split(32)
    preset = Plan.of(cfg, CPU).train_preset(0)
    step(*next(split.train_batches(0, 8, 0)), preset, torch.Generator().manual_seed(0))  # warm caches
    recorder = HostTensorRecorder()

    def recorded(batches):
        with recorder:
            yield from batches

    with caplog.at_level("INFO", logger="simpsons.engine"):
        train_one_epoch(step, recorded(split.train_batches(0, 8, 0)), preset, 0, 0, log_every=1, log_label="e")
    assert recorder.found == []
    assert re.fullmatch(r"e step 1 loss \d+\.\d{3} \d+ img/s at \d+ px", caplog.records[0].getMessage())


def test_ddp_does_not_broadcast_buffers_before_each_forward(tmp_path):
    options = ddp_options(_cfg())
    signature = torch.nn.parallel.DistributedDataParallel.__init__.__code__.co_varnames
    switch = "forward_sync_buffers" if "forward_sync_buffers" in signature else "broadcast_buffers"
    assert options[switch] is False and options["gradient_as_bucket_view"] and options["bucket_cap_mb"] == 5.0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = _cfg()
        step = _step(cfg, prepare=lambda m: torch.nn.parallel.DistributedDataParallel(m, **options))
        assert step.model.broadcast_buffers is False  # the property both torch versions have
        split = _split(16)
        stats = train_one_epoch(step, split.train_batches(0, 8, 0), Plan.of(cfg, CPU).train_preset(0), 0, 0)
        assert stats.images == 16 and np.isfinite(stats.loss)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_gives_one_shape_per_epoch_and_resumes_exactly(world):
    n, batch = 50, 4
    split = ResidentSplit(np.zeros((n, 2, 2, 3), dtype=np.uint8), np.arange(n))
    full = [[y.tolist() for _, y in split.train_batches(2, batch, 0, r, world, drop_last=True)] for r in range(world)]
    steps = split.steps_per_epoch(batch, world, drop_last=True)
    assert steps == n // world // batch and all(len(f) == steps for f in full)
    assert {len(b) for f in full for b in f} == {batch}  # no partial batch
    assert split.steps_per_epoch(batch, world) == -(-(n // world) // batch)  # without: one more, partial
    done = 2
    rest = [
        [y.tolist() for _, y in split.train_batches(2, batch, 0, r, world, start=done * batch * world, drop_last=True)]
        for r in range(world)
    ]
    assert rest == [f[done:] for f in full]
    # Fewer images than one batch per rank: that one partial batch is kept.
    tiny = ResidentSplit(np.zeros((6, 2, 2, 3), dtype=np.uint8), np.arange(6))
    assert [len(y) for _, y in tiny.train_batches(0, 8, 0, drop_last=True)] == [6]
    assert tiny.steps_per_epoch(8, drop_last=True) == 1


def test_evaluation_every_n_epochs_and_at_the_last(monkeypatch):
    plan = Plan.of(_cfg("optim.epochs=7", "train.evaluate_every=3"), CPU)
    assert [e for e in range(7) if plan.evaluates(e)] == [2, 5, 6]
    assert all(Plan.of(_cfg("optim.epochs=3"), CPU).evaluates(e) for e in range(3))
    assert Plan.of(_cfg("train.eval_batch=100", "optim.batch_size=64"), CPU, world=2).eval_batch == 100
    # MLflow gets an unevaluated epoch's score as Tune does (the last evaluated one), none before the first.
    from simpsons.tracking import epoch_metrics

    skipped = {"epoch": 3, "train_loss": 1.0, "evaluated": False, "val_macro_f1": -math.inf, "last_val_macro_f1": 0.4}
    assert epoch_metrics(skipped) == {"train_loss": 1.0, "val_macro_f1": 0.4, "last_val_macro_f1": 0.4}
    assert epoch_metrics({**skipped, "last_val_macro_f1": -math.inf}) == {"train_loss": 1.0}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # no GPU here
    assert not Plan.of(_cfg(), CPU).pad_eval and Plan.of(_cfg(), torch.device("cuda", 0)).pad_eval


def test_compile_is_in_place_and_leaves_the_moving_average_uncompiled():
    step = _step(_cfg("train.compile=true", "optim.ema_decay=0.9"))
    plain = _step(_cfg("optim.ema_decay=0.9"))
    assert type(step.model) is type(plain.model) and step.model.state_dict().keys() == plain.model.state_dict().keys()
    assert step.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert step.ema.module._compiled_call_impl is None  # a copy made after would call the original's forward


def test_norm_weights_and_biases_take_no_weight_decay():
    cfg = _cfg("optim.weight_decay=0.05")
    model, _, optimizer = build_components(cfg, [1] * len(CLASS_NAMES), CPU)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert decays[id(param)] == (0.05 if param.ndim > 1 else 0.0), name
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert decays[id(bn.weight)] == 0.0 and decays[id(bn.bias)] == 0.0
    assert len(parameter_groups(model, cfg)) == 2 and optimizer.param_groups[0]["lr"] == cfg.optim.lr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from simpsons.deploy import export_model
    from simpsons.model import create_model

    cfg = _cfg()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    return export_model(create_model(42, cfg.model.head, cfg.model.dropout).eval(), cfg, list(CLASS_NAMES), path)


def test_exported_model_runs_on_the_device_asked_for(exported):
    # The meta device stands in for a GPU: a constant left on the CPU fails there as it would on CUDA.
    from simpsons.deploy import load_exported

    images = torch.zeros(3, 40, 40, 3, dtype=torch.uint8)
    as_exported, _ = load_exported(exported)
    with pytest.raises(RuntimeError, match="device"):
        as_exported(images.to("meta"))  # what export alone gives: the CPU fixed in the graph
    moved, meta = load_exported(exported, "meta")
    probs = moved(images.to("meta"))
    assert probs.device.type == "meta" and probs.shape == (3, 42) and meta["stored_size"] == 40
    assert {t.device.type for t in moved.state_dict().values()} == {"meta"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the machine without CUDA")
def test_exported_model_asked_for_cuda_without_cuda_is_one_sentence(exported):
    from simpsons.data import DataError
    from simpsons.inference import load_classifier

    with pytest.raises(DataError) as caught:
        load_classifier(exported, "cuda")
    assert str(caught.value) == "Device cuda asked for, but CUDA is not available on this machine; pass --device cpu."
    classifier = load_classifier(exported)  # by default: the CPU here
    assert classifier.device.type == "cpu"
    assert classifier.probabilities(np.zeros((2, 40, 40, 3), np.uint8)).shape == (2, 42)
