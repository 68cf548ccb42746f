"""The training engine: one step, one epoch, one evaluation, in plain PyTorch.

Every input is explicit - the model, its optimizer, the epoch's preset (the image side it trains
at), the seed - so the Ray worker (simpsons.worker), the tests and the benchmarks run the same
code with no config and no Ray. `simpsons.recipe` turns a config into these inputs.

    step = TrainStep(model, criterion, optimizer, scheduler, dtype, per_step_schedule, ema_decay)
    stats = train_one_epoch(step, split.train_batches(...), preset, seed, epoch)
    cm, loss = evaluate(model, criterion, split, eval_preset, dtype, batch_size, num_classes)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from simpsons.augment import EvalPreset, TrainPreset, mixed_targets
from simpsons.data import ResidentSplit, mix_seed
from simpsons.metrics import confusion_matrix
from simpsons.model import classify

_logger = logging.getLogger(__name__)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting ("auto", "bf16", "fp16", "fp32"), None for fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            # Native bf16 only (compute capability 8.0+, Ampere on): torch.cuda.is_bf16_supported() also
            # says yes on T4 and V100, which emulate bf16 and have no bf16 cuDNN convolutions, and it
            # asks the current device, not this one. Older GPUs take fp16 + GradScaler.
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class MovingAverage(torch.optim.swa_utils.AveragedModel):
    """The exponential moving average of a model's weights and buffers (`decay` per update), whose
    update never waits for the device.

    torch's AveragedModel.update_parameters reads its update counter on every call
    (bool(n_averaged == 0), n_averaged > 0): with the counter on the GPU two syncs per step, and on
    the host its .to(device) copy is one. Here the counter is mirrored on the host (read from the
    device once, at the first update, so a checkpoint's count filled in by checkpoint.restore
    counts) and the device's copy, which checkpoints save, only ever advances there.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        device = next(model.parameters()).device
        multi_avg_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
        super().__init__(model, device=device, multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.updates: int | None = None  # the host's mirror of n_averaged

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates is None:
            self.updates = int(self.n_averaged)  # once per run (after a restore), not per step
        if self.updates == 0:
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)
        else:
            by_dtype: dict[torch.dtype, tuple[list, list]] = {}
            for mine, theirs in zip(averaged, current):
                pair = by_dtype.setdefault(mine.dtype, ([], []))
                pair[0].append(mine)
                pair[1].append(theirs)
            for mine, theirs in by_dtype.values():  # lerp for floats, a weighted copy for counters
                self.multi_avg_fn(mine, theirs, self.n_averaged)
        self.n_averaged += 1
        self.updates += 1


class TrainStep:
    """One optimisation step: augment -> forward under autocast -> loss -> backward -> step."""

    def __init__(
        self,
        model: torch.nn.Module,
        criterion: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        dtype: torch.dtype | None,
        per_step_schedule: bool,
        ema_decay: float,
        compile: bool = False,
    ):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.device = next(model.parameters()).device
        self.dtype = dtype  # autocast dtype, None for fp32
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.per_step_schedule = per_step_schedule  # the scheduler steps every batch (else every epoch)
        # Under DDP with gradient_as_bucket_view the gradients are views into the all-reduce buckets;
        # setting them to None would make autograd allocate fresh ones that DDP copies back every step.
        self.set_to_none = not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        # The weights' moving average, BatchNorm statistics included (MovingAverage: no sync per update).
        self.ema = MovingAverage(getattr(model, "module", model), ema_decay) if ema_decay else None
        if compile:
            # In place (the module's type and state_dict keys unchanged, DDP's wrapper around it) and
            # after the moving average's copy: a copy of a compiled module would call the original's forward.
            getattr(model, "module", model).compile()

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, preset: TrainPreset, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits), detached, of one step on (B, S, S, 3) uint8 `images` made into the
        network's (B, 3, T, T) inputs by `preset` (T = preset.train_size), mixed by preset.mix
        when mixup or cutmix is on (the loss then takes the mixed soft targets)."""
        x, share = preset.mix(preset(images, generator), generator)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(x)  # (B, C)
            targets = labels if share is None else mixed_targets(labels, share, logits.shape[1])
            loss = self.criterion(logits, targets)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(getattr(self.model, "module", self.model))
        return loss.detach(), logits.detach()


@dataclass
class EpochStats:
    """What one training epoch measured, summed over every rank."""

    loss: float  # mean training loss per image
    accuracy: float  # of the training predictions, on augmented images (mixed: against the own label, its larger share)
    images: int  # trained on, all ranks together
    seconds: float  # wall time, the device's queued work included
    steps: list[list[int]] = field(default_factory=list)  # [first, end) steps trained, one range per attempt

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class EpochProgress:
    """How far an epoch has got, over every rank: what a mid-epoch checkpoint keeps so that the
    resumed run trains the rest of the epoch, and reports its figures, as an uninterrupted one would."""

    step: int = 0  # steps trained (the same on every rank)
    images: int = 0  # images trained, all ranks together: the position in the epoch's permutation
    loss_sum: float = 0.0  # sum of the images' training losses
    correct: float = 0.0  # training predictions that were right
    seconds: float = 0.0  # training time
    steps: list[list[int]] = field(default_factory=list)  # [first, end) steps trained, one range per attempt


def train_one_epoch(
    step: TrainStep,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    preset: TrainPreset,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    resume: EpochProgress | None = None,
    hook: Callable[[int, Callable[[], EpochProgress]], None] | None = None,
    hook_every: int = 0,
    log_every: int = 0,
    log_label: str = "",
) -> EpochStats:
    """Run `step` over `batches` ((B, S, S, 3) uint8 images, (B,) labels) at `preset`'s side and
    return the epoch's loss and accuracy, summed on the device and read once at the end (no per-step sync).

    `resume` continues an epoch where a mid-epoch checkpoint left it (`batches` then start at its
    position: ResidentSplit.train_batches(start=resume.images)). Every `hook_every` steps it calls
    `hook(steps of the epoch done, progress)`; `progress()` returns the EpochProgress so far, and
    with world > 1 it is a collective: every rank calls it at the same step, or none does.
    Every `log_every` steps it logs the running loss and speed after `log_label` (e.g. "epoch 3/30").

    With world > 1 it all-reduces the sums, so every rank must call it with the same number of batches.
    """
    resume = resume or EpochProgress()
    device = step.device
    generator = torch.Generator(device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct
    if rank == 0 and resume.images:  # the part trained before the resume, counted once (on rank 0)
        sums += torch.tensor([resume.loss_sum, resume.correct], dtype=torch.float64).to(device)
    images = 0  # on the host, where it is known: a per-step torch.tensor(n, device="cuda") would block
    done = resume.step
    logged_loss = LaggedValue(device)
    started = time.perf_counter()

    def progress() -> EpochProgress:
        totals = sums.clone()
        if world > 1:
            dist.all_reduce(totals)
        return EpochProgress(
            step=done,
            images=resume.images + images * world,
            loss_sum=float(totals[0]),
            correct=float(totals[1]),
            seconds=resume.seconds + time.perf_counter() - started,
            steps=[*resume.steps, [resume.step, done]],
        )

    for i, (batch, labels) in enumerate(batches, start=resume.step):
        # Each step draws its augmentations and dropout masks from seeds of its own, so a run
        # resumed at step i draws what an uninterrupted run draws there (seeding is host-side: no
        # sync). Every rank draws its own: with one seed on all ranks, DDP would average gradients
        # of identically masked networks and waste the workers' diversity.
        generator.manual_seed(mix_seed(seed, epoch, rank, 0, i))
        torch.manual_seed(mix_seed(seed, epoch, rank, 1, i))  # dropout masks
        loss, logits = step(batch, labels, preset, generator)
        sums += torch.stack([loss.double() * len(labels), (logits.argmax(1) == labels).sum().double()])
        images += len(labels)
        done = i + 1
        if log_every and done % log_every == 0:
            shown = logged_loss.swap(loss, done)
            _logger.info(
                "%s step %d loss %s %.0f img/s at %d px",
                log_label,
                done,
                loss_text(shown, done),
                images * world / (time.perf_counter() - started),
                preset.train_size,
            )
        if hook and done % hook_every == 0:
            hook(done, progress)
    synchronize(device)  # nothing in the steps waits for the GPU: the time must
    seconds = resume.seconds + time.perf_counter() - started
    if world > 1:
        dist.all_reduce(sums)
    images = resume.images + images * world  # every rank takes the same number of images
    return EpochStats(
        loss=float(sums[0]) / max(1, images),
        accuracy=float(sums[1]) / max(1, images),
        images=images,
        seconds=seconds,
        steps=[*resume.steps, [resume.step, done]],
    )


def loss_text(shown: tuple[int, float] | None, step: int) -> str:
    """A progress line's loss: LaggedValue's (step, value), its step named when it is an earlier one."""
    if shown is None:
        return "pending"
    return f"{shown[1]:.3f}" + (f" (at step {shown[0]})" if shown[0] != step else "")


class LaggedValue:
    """A device scalar read without waiting for the device, for progress lines: swap(value, step)
    starts a non-blocking copy of `value` to pinned host memory and returns the (step, value) of the
    copy started at the previous swap once it has arrived (None before that). Reading the loss
    itself (float(loss)) would stall the logging rank until the GPU catches up, and every other
    rank at the next all-reduce."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        self.last: tuple[int, float] | None = None

    def swap(self, value: torch.Tensor, step: int) -> tuple[int, float] | None:
        self._collect()
        if self.pending is None:
            host = torch.empty((), dtype=value.dtype, pin_memory=self.device.type == "cuda")
            host.copy_(value.detach(), non_blocking=True)
            copied = None
            if self.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record()
            self.pending = (step, host, copied)
        self._collect()  # on the CPU the copy is done: this step's value
        return self.last

    def _collect(self) -> None:
        if self.pending is not None:
            at, host, copied = self.pending
            if copied is None or copied.query():  # query() asks, it does not wait
                self.last, self.pending = (at, float(host)), None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    split: ResidentSplit,
    preset: EvalPreset,
    dtype: torch.dtype | None,
    batch_size: int,
    num_classes: int,
    tta_flip: bool = False,
    rank: int = 0,
    world: int = 1,
    pad_last: bool = False,
) -> tuple[torch.Tensor, float]:
    """(confusion matrix (C, C) summed over all ranks, mean loss over the whole split), this rank
    taking every world-th image in batches of `batch_size` (with `pad_last` the last one padded to
    it: one shape for cuDNN and torch.compile). Nothing in the loop reads the device: the two
    figures are read once, at the end.

    `model` is the trained network, its DDP wrapper or its moving average (AveragedModel)."""
    # The bare module, not the DDP (or AveragedModel) wrapper: the wrapper's first forward after training broadcasts
    # the BatchNorm buffers, a collective that a rank with no validation batch (fewer images than
    # ranks) never joins, pairing the others' broadcast with its all_reduce below: a hang. Every
    # rank broadcasts here instead, so all evaluate with rank 0's statistics, as its checkpoint holds.
    model = getattr(model, "module", model)
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    model.eval()
    device = next(model.parameters()).device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in split.eval_batches(batch_size, rank, world):
        n = len(labels)
        if (
            pad_last and n < batch_size
        ):  # the last batch, padded to the fixed shape (one kernel set); the padding's logits dropped
            images = images[torch.arange(batch_size, device=images.device) % n]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = classify(model, preset(images), tta_flip)[:n]
        loss_sum += criterion(logits, labels).double() * len(labels)
        cm += confusion_matrix(labels, logits.argmax(1), num_classes)
    if world > 1:
        dist.all_reduce(cm)
        dist.all_reduce(loss_sum)
    model.train()
    total = int(cm.sum())
    return cm, float(loss_sum) / max(1, total)
