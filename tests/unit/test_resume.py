"""Mid-epoch checkpoints resume exactly: plain PyTorch on the CPU (no Ray), the worker's own pieces.

A run interrupted in the middle of an epoch and resumed from its mid-epoch checkpoint trains the
same batches with the same random draws as an uninterrupted run of the same seed: after every
step of the resumed part its weights are bit for bit the uninterrupted run's, and so are the
epoch's figures. The Ray side (a preemption notice, a drained and lost node) is in test_spot.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import numpy as np
import pytest
import torch
from tiny import ALL_AUGMENTATIONS

from simpsons import checkpoint
from simpsons.config import load_config
from simpsons.data import CLASS_NAMES, ResidentSplit
from simpsons.engine import EpochProgress, TrainStep, train_one_epoch
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_step

CPU = torch.device("cpu")
BATCH, STEPS = 8, 5  # 40 images: five steps an epoch
CUT = 2  # the checkpoint is taken after step 2 of epoch 1


def _cfg(*more: str):
    # Everything that draws random numbers or keeps state is on: dropout, augmentation, the
    # moving average, a per-step schedule with warm-up.
    overrides = ["data.stored_size=40", "data.train_size=32", f"optim.batch_size={BATCH}", "optim.epochs=2"]
    return load_config(None, [*overrides, "model.dropout=0.3", "optim.ema_decay=0.9", "optim.warmup_epochs=0.5", *more])


def _split() -> ResidentSplit:
    rng = np.random.default_rng(0)
    n = BATCH * STEPS
    return ResidentSplit(rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8), rng.integers(0, len(CLASS_NAMES), n))


def _fresh(cfg, split) -> TrainStep:
    counts = np.bincount(split.labels.numpy(), minlength=len(CLASS_NAMES)).tolist()
    model, criterion, optimizer = build_components(cfg, counts, CPU)
    return create_train_step(cfg, model, criterion, optimizer, create_scheduler(optimizer, cfg, STEPS))


def _epoch(step: TrainStep, batches, epoch: int, cfg, **kwargs):
    return train_one_epoch(step, batches, Plan.of(cfg, CPU).train_preset(epoch), cfg.train.seed, epoch, **kwargs)


def _digest(step: TrainStep) -> str:
    """sha256 of everything a step changes: weights, BatchNorm statistics, the moving average,
    the optimizer's moments, the schedule."""
    sha = hashlib.sha256()
    state = checkpoint.training_state(step.model, step.optimizer, step.scheduler, step.scaler, step.ema)
    for value in _tensors(state):
        sha.update(value.contiguous().numpy().tobytes())
    sha.update(repr(step.scheduler.state_dict()).encode())
    return sha.hexdigest()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class Recorder:
    """train_one_epoch's hook: the state digest after every step, by (epoch, step)."""

    def __init__(self, step: TrainStep):
        self.step, self.epoch, self.after = step, 0, {}

    def __call__(self, done: int, progress) -> None:
        self.after[(self.epoch, done)] = _digest(self.step)


class NodeLost(Exception):
    pass


@pytest.mark.parametrize("augmentations", [(), ALL_AUGMENTATIONS], ids=["default", "all_augmentations"])
def test_a_run_resumed_mid_epoch_matches_an_uninterrupted_run_batch_by_batch(tmp_path, augmentations):
    torch.set_num_threads(1)  # the same kernels in both runs
    cfg, split = _cfg(*augmentations), _split()

    # The uninterrupted run: two epochs, every step recorded.
    whole = _fresh(cfg, split)
    seen = Recorder(whole)
    stats = []
    for epoch in range(2):
        seen.epoch = epoch
        batches = split.train_batches(epoch, BATCH, cfg.train.seed)
        stats.append(_epoch(whole, batches, epoch, cfg, hook=seen, hook_every=1))

    # The interrupted run: epoch 0, then epoch 1 is checkpointed after step 2, trains one step more
    # (the run keeps training after a notice) and its node is lost.
    cut = _fresh(cfg, split)
    _epoch(cut, split.train_batches(0, BATCH, cfg.train.seed), 0, cfg)

    def checkpoint_then_lose_the_node(done: int, progress) -> None:
        if done == CUT:
            state = checkpoint.training_state(cut.model, cut.optimizer, cut.scheduler, cut.scaler, cut.ema, epoch=1,
                                              best_score=0.0, history=[], config={}, class_names=list(CLASS_NAMES),
                                              progress=asdict(progress()))  # fmt: skip
            checkpoint.save(tmp_path, state, {"epoch": 1, "step": done})
        if done == CUT + 1:
            raise NodeLost

    with pytest.raises(NodeLost):
        batches = split.train_batches(1, BATCH, cfg.train.seed)
        _epoch(cut, batches, 1, cfg, hook=checkpoint_then_lose_the_node, hook_every=1)

    # The replacement: fresh objects, the checkpoint restored, epoch 1 continued at step 3.
    resumed = _fresh(cfg, split)
    state = checkpoint.load(tmp_path)
    checkpoint.restore(state, resumed.model, resumed.optimizer, resumed.scheduler, resumed.scaler, resumed.ema)
    epoch, saved = checkpoint.resume_point(state)
    progress = EpochProgress(**saved)
    assert (epoch, progress.step, progress.images) == (1, CUT, CUT * BATCH)
    after = Recorder(resumed)
    after.epoch = 1
    batches = split.train_batches(1, BATCH, cfg.train.seed, start=progress.images)
    finished = _epoch(resumed, batches, 1, cfg, resume=progress, hook=after, hook_every=1)

    assert seen.after[(1, CUT)] != seen.after[(1, CUT + 1)]  # every step changes the digest
    assert list(after.after) == [(1, step) for step in range(CUT + 1, STEPS + 1)]  # the rest of the epoch, once
    for key, digest in after.after.items():
        assert digest == seen.after[key], f"epoch 1 step {key[1]} differs from the uninterrupted run"
    # The epoch's figures count the part before the checkpoint once, as the uninterrupted run's do.
    assert (finished.loss, finished.accuracy, finished.images) == (stats[1].loss, stats[1].accuracy, stats[1].images)
    assert finished.steps == [[0, CUT], [CUT, STEPS]] and stats[1].steps == [[0, STEPS]]


def test_an_epoch_end_checkpoint_resumes_at_the_next_epoch():
    assert checkpoint.resume_point({"epoch": 3}) == (4, None)
    assert checkpoint.resume_point({"epoch": 3, "progress": {"step": 7}}) == (3, {"step": 7})


@pytest.mark.parametrize("world, resumed_world", [(2, 2), (3, 3), (2, 3)])
def test_resumed_batches_are_the_rest_of_the_epochs_permutation(world, resumed_world):
    # Labels stand for image indices here, so each batch says which images it holds.
    n, batch = 50, 4
    split = ResidentSplit(np.zeros((n, 2, 2, 3), dtype=np.uint8), np.arange(n))

    def trained(start: int, ranks: int) -> list[list[int]]:
        per_rank = [
            [b[1].tolist() for b in split.train_batches(5, batch, 0, r, ranks, start=start)] for r in range(ranks)
        ]
        assert len({len(steps) for steps in per_rank}) == 1  # every rank the same step count (DDP)
        return per_rank

    full = trained(0, world)
    done_steps = 3
    position = done_steps * batch * world
    rest = trained(position, resumed_world)
    if resumed_world == world:  # the same batches, step by step, on every rank
        assert rest == [steps[done_steps:] for steps in full]
    before = [i for steps in full for b in steps[:done_steps] for i in b]
    after = [i for steps in rest for b in steps for i in b]
    assert len(before + after) == len(set(before + after))  # no image twice in the epoch
    assert len(before + after) >= n - 2 * max(world, resumed_world)  # and none left out but the trim


def test_mid_epoch_reports_stay_out_of_tune():
    """Tune's scheduler counts epochs: a mid-epoch report (no validation) must not reach it."""
    import queue

    from simpsons.names import MID_EPOCH, SCORE
    from simpsons.tune import EPOCHS, EpochReportCallback

    callback = EpochReportCallback.__new__(EpochReportCallback)  # its __init__ needs a live Tune session
    callback._training_actor_item_queue = sent = queue.Queue()  # what Tune's trial actor reads
    callback.after_report(None, [{"epoch": 2, "step": 7, SCORE: float("-inf"), MID_EPOCH: True}], None)
    assert sent.empty()
    callback.after_report(None, [{"epoch": 2, SCORE: 0.5}], None)
    assert sent.get_nowait() == {"epoch": 2, SCORE: 0.5, EPOCHS: 3}
