"""Ray Train loop: resident data, batched augmentation, mixed precision, DDP, per-epoch reports.

`train_loop_per_worker(config)` runs in every Ray Train worker; `build_trainer` wires it to a
TorchTrainer (also used per trial by the Tune sweep) and `fit` runs a whole job: train, then
export the best checkpoint with its metrics to `<storage>/<run name>/best/`.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.collective
import ray.train.torch
import torch
import torch.distributed as dist

from simpsons import checkpoint, storage, tracking
from simpsons.augment import create_eval_preset, create_train_preset
from simpsons.cli import configure_logging
from simpsons.cluster import (
    CONTROLLER_FAILURE_LIMIT,
    LaunchWatch,
    absolute_dataset_uri,
    bound_capacity_wait,
    capacity_error,
    prepare_run,
    worker_resources,
)
from simpsons.config import Config, config_text, from_dict, to_dict
from simpsons.data import ResidentSplit, data_placement, mix_seed
from simpsons.dataset import check_dataset, load_packed, local_dataset_dir, read_manifest
from simpsons.loss import FocalLoss, resolve_alpha
from simpsons.metrics import classification_report, confusion_matrix
from simpsons.model import classify, create_model, is_head, zero_init_residual
from simpsons.weights import load_weights, pretrained

_logger = logging.getLogger(__name__)

SCORE = "val_macro_f1"  # the metric checkpoints are ranked by


# ---------------------------------------------------------------------------------------------
# Building blocks (plain PyTorch; no Ray here, so tests and benchmarks call them directly)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for fp32."""
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


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Warm-up + cosine stepped every batch, or ReduceLROnPlateau stepped every epoch on val loss."""
    if cfg.optim.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience
        )
    total = max(1, cfg.optim.epochs * steps_per_epoch)
    # At most a quarter of the run warms up, so a short run (EPOCHS=1) still trains at full rate.
    warmup = min(total // 4, int(cfg.optim.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TrainStep:
    """One optimisation step: augment -> forward under autocast -> focal loss -> backward -> step."""

    def __init__(self, model, criterion, optimizer, scheduler, cfg: Config, device: torch.device):
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.cfg = cfg
        self.dtype = amp_dtype(cfg.train.precision, device)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.preset = create_train_preset(cfg)
        self.per_step_schedule = cfg.optim.schedule == "cosine"
        # Under DDP with gradient_as_bucket_view the gradients are views into the all-reduce buckets;
        # setting them to None would make autograd allocate fresh ones that DDP copies back every step.
        self.set_to_none = not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        # The weights' moving average (optim.ema_decay), BatchNorm statistics included; its update is
        # one fused lerp per tensor on the device, no sync.
        self.ema = None
        if cfg.optim.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                getattr(model, "module", model),
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay),
                use_buffers=True,
            )

    def inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # images: (B, S, S, 3) uint8 -> (B, 3, T, T) float, T = this epoch's side (augment.train_size_at)
        return self.preset(images, generator)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs(images, generator)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(x)  # (B, C)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(getattr(self.model, "module", self.model))
        return loss.detach(), logits.detach()


def build_components(cfg: Config, class_counts: list[int], device: torch.device, prepare=lambda m: m):
    """Model (its starting weights loaded, prepared for DDP by `prepare`), focal loss and AdamW."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = create_model(len(class_counts), m.head, m.dropout, m.arch)
    if m.zero_init_residual:
        zero_init_residual(model)  # before any weights are loaded: pretrained weights replace it
    load_weights(model, m.arch, m.weights, cfg.data.cache_dir, cfg.run.s3_endpoint)
    groups = parameter_groups(model, cfg)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare(model)
    alpha = resolve_alpha(cfg.loss.alpha, class_counts, cfg.loss.alpha_power)
    criterion = FocalLoss(alpha, cfg.loss.gamma, cfg.loss.label_smoothing).to(device)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda"
    )
    return model, criterion, optimizer


def parameter_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """The classifier at optim.lr, then, with model.weights loaded, the pretrained backbone at
    optim.lr x optim.backbone_lr_scale (one group at optim.lr otherwise)."""
    if not pretrained(cfg.model.weights):
        return [{"params": list(model.parameters()), "lr": cfg.optim.lr}]
    head, backbone = [], []
    for name, param in model.named_parameters():
        (head if is_head(cfg.model.arch, name) else backbone).append(param)
    return [
        {"params": head, "lr": cfg.optim.lr},
        {"params": backbone, "lr": cfg.optim.lr * cfg.optim.backbone_lr_scale},
    ]


@dataclass
class EpochStats:
    """What one training epoch measured, summed over every rank."""

    loss: float  # mean training loss per image
    accuracy: float  # of the training predictions, on augmented images
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
    epoch: int,
    cfg: Config,
    rank: int = 0,
    world: int = 1,
    steps_per_epoch: int = 0,
    resume: EpochProgress | None = None,
    hook: Callable[[int, Callable[[], EpochProgress]], None] | None = None,
    hook_every: int = 0,
) -> EpochStats:
    """Run `step` over `batches` ((B, S, S, 3) uint8 images, (B,) labels) and return the epoch's
    loss and accuracy, summed on the device and read once at the end (no per-step sync).

    `resume` continues an epoch where a mid-epoch checkpoint left it (`batches` then start at its
    position: ResidentSplit.train_batches(start=resume.images)). Every `hook_every` steps it calls
    `hook(steps of the epoch done, progress)`; `progress()` returns the EpochProgress so far, and
    with world > 1 it is a collective: every rank calls it at the same step, or none does.

    Plain PyTorch: the Ray worker, the tests and the benchmarks all run this function. With
    world > 1 it all-reduces the sums, so every rank must call it with the same number of batches.
    """
    resume = resume or EpochProgress()
    device = next(step.model.parameters()).device
    step.preset = create_train_preset(cfg, epoch)  # this epoch's side (data.resize_from: progressive resizing)
    generator = torch.Generator(device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct
    if rank == 0 and resume.images:  # the part trained before the resume, counted once (on rank 0)
        sums += torch.tensor([resume.loss_sum, resume.correct], dtype=torch.float64).to(device)
    images = 0  # on the host, where it is known: a per-step torch.tensor(n, device="cuda") would block
    done = resume.step
    log_every = cfg.train.log_every if rank == 0 else 0
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
        generator.manual_seed(mix_seed(cfg.train.seed, epoch, rank, 0, i))
        torch.manual_seed(mix_seed(cfg.train.seed, epoch, rank, 1, i))  # dropout masks
        loss, logits = step(batch, labels, generator)
        sums += torch.stack([loss.double() * len(labels), (logits.argmax(1) == labels).sum().double()])
        images += len(labels)
        done = i + 1
        if log_every and done % log_every == 0:
            _logger.info(
                "epoch %d/%d step %d/%d loss %.3f %.0f img/s at %d px",
                epoch + 1,
                cfg.optim.epochs,
                done,
                steps_per_epoch,
                float(loss),
                images * world / (time.perf_counter() - started),
                step.preset.train_size,
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model,
    criterion,
    split: ResidentSplit,
    cfg: Config,
    device: torch.device,
    num_classes: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, float]:
    """(confusion matrix (C, C) summed over all ranks, mean loss over the whole split).

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
    preset = create_eval_preset(cfg)
    dtype = amp_dtype(cfg.train.precision, device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    batch = max(1, cfg.optim.batch_size // world) * 2
    for images, labels in split.eval_batches(batch, rank, world):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = classify(model, preset(images), cfg.model.tta_flip)
        loss_sum += criterion(logits, labels).double() * len(labels)
        cm += confusion_matrix(labels, logits.argmax(1), num_classes)
    if world > 1:
        dist.all_reduce(cm)
        dist.all_reduce(loss_sum)
    model.train()
    total = int(cm.sum())
    return cm, float(loss_sum) / max(1, total)


# ---------------------------------------------------------------------------------------------
# The Ray Train worker: setup -> restore -> epochs (train, evaluate, report with a checkpoint)


def train_loop_per_worker(config: dict) -> None:
    cfg, dataset_uri, code = from_dict(config["cfg"]), config["dataset"], config["code_version"]
    configure_logging()  # this process is a Ray worker: rank 0's lines reach the driver's output
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.train.cpus_per_worker >= 1:
        torch.set_num_threads(int(cfg.train.cpus_per_worker))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    dataset_dir = local_dataset_dir(dataset_uri, cfg.data.cache_dir, cfg.run.s3_endpoint)
    manifest = read_manifest(dataset_dir)
    class_names = manifest["class_names"]
    origin = checkpoint.provenance(dataset_uri, dataset_dir, code)
    train_split, val_split = resident_splits(dataset_dir, device, cfg.data.resident_share, announce=rank == 0)
    per_worker_batch = cfg.optim.batch_size // world
    steps_per_epoch = train_split.steps_per_epoch(per_worker_batch, world)

    ddp_kwargs = {"gradient_as_bucket_view": True, "static_graph": True, "bucket_cap_mb": cfg.train.ddp_bucket_mb}
    model, criterion, optimizer = build_components(
        cfg,
        manifest["splits"]["train"]["class_counts"],
        device,
        prepare=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs),
    )
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    step = TrainStep(model, criterion, optimizer, scheduler, cfg, device)

    start_epoch, best_score, history, partial = 0, -1.0, [], None
    resumed_from = ray.train.get_checkpoint()
    if resumed_from:
        with resumed_from.as_directory() as folder:
            state = checkpoint.load(folder, device)
        checkpoint.restore(state, model, optimizer, scheduler, step.scaler, step.ema)
        best_score, history = state["best_score"], state["history"]
        start_epoch, saved_progress = checkpoint.resume_point(state)
        partial = EpochProgress(**saved_progress) if saved_progress else None
        if rank == 0 and partial:
            _logger.info(
                "Resuming from the checkpoint of epoch %d step %d; continuing at its step %d.",
                state["epoch"],
                partial.step,
                partial.step,
            )
        elif rank == 0:
            _logger.info(
                "Resuming from the checkpoint of epoch %d; continuing at epoch %d.", state["epoch"], start_epoch
            )

    def save(epoch: int, figures: dict, progress: EpochProgress | None = None) -> ray.train.Checkpoint | None:
        """Rank 0 writes the checkpoint folder (Ray deletes it once uploaded); other ranks report None."""
        if rank != 0:
            return None
        extra = {"progress": asdict(progress)} if progress else {}
        state = checkpoint.training_state(model, optimizer, scheduler, step.scaler, step.ema, epoch=epoch,
                                          best_score=best_score, history=history, config=to_dict(cfg),
                                          class_names=list(class_names), provenance=origin,
                                          tracking_run=tracker.run_id if tracker else "", **extra)  # fmt: skip
        folder = tempfile.mkdtemp(prefix=f"simpsons-ckpt-{epoch}-")
        metrics = {"epoch": epoch, **figures, "history": history, "provenance": origin}
        return ray.train.Checkpoint.from_directory(checkpoint.save(folder, state, metrics))

    mid_epoch = _MidEpochCheckpoints(cfg, save, rank, steps_per_epoch)
    writer = _TensorBoard(cfg) if rank == 0 else None
    tracker = None  # rank 0's MLflow logger (run.tracking_uri), sending from a thread of its own
    if rank == 0:
        tracker = tracking.EpochLogger.create(
            config.get("tracking"), lambda: tracking.run_tags(origin, world, device, step.dtype)
        )
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        resume, partial = (partial if epoch == start_epoch else None), None
        batches = train_split.train_batches(
            epoch, per_worker_batch, cfg.train.seed, rank, world, start=resume.images if resume else 0
        )
        mid_epoch.epoch = epoch
        trained = train_one_epoch(
            step, batches, epoch, cfg, rank, world, steps_per_epoch, resume, mid_epoch, mid_epoch.hook_every
        )
        if writer and cfg.train.histogram_every and (epoch + 1) % cfg.train.histogram_every == 0:
            writer.histograms(getattr(model, "module", model), epoch)  # the epoch's last gradients are still in .grad
        cm, report, validated = validate(step, val_split, cfg, class_names, rank, world)
        metrics = {"epoch": epoch, "train_loss": trained.loss, "train_acc": trained.accuracy, **validated,
                   "lr": optimizer.param_groups[0]["lr"], "train_img_per_s": trained.images_per_s,
                   "epoch_time_s": time.perf_counter() - started, "resumed": bool(resumed_from),
                   "trained_steps": trained.steps}  # fmt: skip
        history.append(metrics)
        best_score = max(best_score, metrics[SCORE])
        if rank == 0:
            _logger.info(epoch_line(metrics, trained, cfg.optim.epochs))
            writer.scalars(metrics, epoch)
        if rank == 0 and tracker:
            tracker.log_epoch(metrics)
        saved = save(epoch, {"val": report, "confusion": cm.cpu().tolist()})
        # The checkpoint is copied to storage in the background while the next epoch trains (a GPU
        # epoch on 8 workers is shorter than the round trip); Ray deletes the local folder when the
        # copy has finished, and the worker's end waits for every pending copy.
        upload = ray.train.CheckpointUploadMode.ASYNC
        ray.train.report(
            metrics, checkpoint=saved, checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=True
        )
    if writer:
        writer.close()
    if tracker:
        tracker.close()


MID_EPOCH = "mid_epoch"  # set in the metrics of a mid-epoch report: no validation, never the best checkpoint


class _MidEpochCheckpoints:
    """train_one_epoch's hook in the worker: every train.preemption_check_steps it asks Ray whether
    a node of the run is being preempted and, on a new notice, reports a just-in-time checkpoint
    (uploaded before training goes on); the run trains on, and when the deadline comes near it
    reports a last one, so a reclaim loses only the steps after that. Every
    train.checkpoint_every_steps it reports one anyway (uploaded in the background).

    Every rank makes the same calls at the same steps: `get_preemption_info` and the last call's
    decision are rank 0's, broadcast (barriers), `report` is a barrier and the progress is
    all-reduced. When the node goes, Ray restarts the run, charged to train.max_preemptions.
    """

    # The last call comes when the deadline is nearer than twice the first checkpoint's time plus
    # twice the time between checks plus this (seconds): it then ends well before the deadline.
    LAST_CALL_SLACK_S = 5.0

    def __init__(self, cfg: Config, save: Callable, rank: int, steps_per_epoch: int):
        self.check, self.every = cfg.train.preemption_check_steps, cfg.train.checkpoint_every_steps
        self.hook_every = math.gcd(self.check, self.every)  # 0 when both are off: no hook
        self.save, self.rank, self.steps_per_epoch = save, rank, steps_per_epoch
        self.epoch = 0  # set by the loop before each epoch
        self.noticed: set[str] = set()  # preempted nodes a checkpoint has been taken for
        self.last_called = False  # the notice's last checkpoint is taken
        self.save_s = 0.0  # how long the notice's first checkpoint took (rank 0)
        self.checked_at = 0.0  # time.time() of the previous check

    def __call__(self, done: int, progress: Callable[[], EpochProgress]) -> None:
        if done >= self.steps_per_epoch:
            return  # the epoch's own checkpoint comes next
        notice, why = None, ""
        if self.check and done % self.check == 0:
            notice = ray.train.get_preemption_info()
            now = time.time()
            since, self.checked_at = now - (self.checked_at or now), now  # seconds between checks
            if notice is not None and set(notice.preempted_node_ids) - self.noticed:
                why, self.last_called = "notice", False
                self.noticed.update(notice.preempted_node_ids)
            elif notice is not None and notice.deadline_ms and not self.last_called:
                left = notice.deadline_ms / 1000 - now
                due = left < 2 * self.save_s + 2 * since + self.LAST_CALL_SLACK_S
                if ray.train.collective.broadcast_from_rank_zero(due):  # rank 0's clocks decide
                    why, self.last_called = "last call", True
        if not why and self.every and done % self.every == 0:
            why = "periodic"
        if not why:
            return
        started = time.time()
        if why != "periodic" and self.rank == 0:
            _logger.warning(
                "Preemption of node(s) %s (ranks %s, %s): %s checkpoint at epoch %d step %d.",
                ", ".join(notice.preempted_node_ids),
                notice.preempted_ranks,
                _time_left(notice.deadline_ms, started),
                "a" if why == "notice" else "the last",
                self.epoch,
                done,
            )
        metrics = {"epoch": self.epoch, "step": done, SCORE: float("-inf"), MID_EPOCH: True}
        mode = ray.train.CheckpointUploadMode.ASYNC if why == "periodic" else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(
            metrics,
            checkpoint=self.save(self.epoch, {"step": done}, progress()),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )
        if why != "periodic" and self.rank == 0:
            self.save_s = time.time() - started if why == "notice" else self.save_s
            _logger.warning(
                "Checkpoint of epoch %d step %d saved in %.1f s, %s; training on until the node goes.",
                self.epoch,
                done,
                time.time() - started,
                _time_left(notice.deadline_ms, time.time()),
            )


def _time_left(deadline_ms: int | None, now: float) -> str:
    return f"{deadline_ms / 1000 - now:.1f} s before its deadline" if deadline_ms else "no deadline given"


def validate(step: TrainStep, split: ResidentSplit, cfg: Config, class_names: list[str], rank: int, world: int):
    """(confusion matrix, report, val_* figures) of the weights that are served: the moving average
    when optim.ema_decay keeps one (the raw weights' scores then come as raw_val_*), else the trained
    weights. A plateau schedule steps on the trained weights' loss."""
    model, device, classes = step.model, step.device, len(class_names)
    raw_cm, raw_loss = evaluate(model, step.criterion, split, cfg, device, classes, rank, world)
    if cfg.optim.schedule == "plateau":
        step.scheduler.step(raw_loss)
    cm, loss = raw_cm, raw_loss
    if step.ema is not None:
        cm, loss = evaluate(step.ema, step.criterion, split, cfg, device, classes, rank, world)
    report = classification_report(cm, class_names)
    figures = {"val_loss": loss, "val_acc": report["accuracy"], "val_macro_precision": report["macro_precision"],
               "val_macro_recall": report["macro_recall"], SCORE: report["macro_f1"],
               "val_weighted_f1": report["weighted_f1"]}  # fmt: skip
    if step.ema is not None:
        raw = classification_report(raw_cm, class_names)
        figures.update(raw_val_loss=raw_loss, raw_val_acc=raw["accuracy"], raw_val_macro_f1=raw["macro_f1"])
    return cm, report, figures


def epoch_line(metrics: dict, trained: EpochStats, epochs: int) -> str:
    m = metrics
    return (f"epoch {m['epoch'] + 1}/{epochs} train loss {m['train_loss']:.3f} acc {m['train_acc']:.3f} | "
            f"val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f} macro-F1 {m[SCORE]:.3f} | "
            f"{trained.images_per_s:.0f} img/s")  # fmt: skip


def resident_splits(
    dataset_dir: str | Path, device: torch.device, share: float, announce: bool = True
) -> tuple[ResidentSplit, ResidentSplit]:
    """The packed train and val splits, kept whole on `device` (or in pinned host memory when they
    do not fit `share` of its free memory)."""
    arrays = {name: load_packed(dataset_dir, name) for name in ("train", "val")}
    on_device, placement = data_placement(sum(a.nbytes for pair in arrays.values() for a in pair), device, share)
    if announce:  # every rank decides for its own device; one line in the log is enough
        _logger.info("Data: train + val %s.", placement)
    return tuple(ResidentSplit(*arrays[name], device=device, on_device=on_device) for name in ("train", "val"))


class _TensorBoard:
    """Rank 0's TensorBoard writer: events go to a local folder, copied to the run's storage now and then.

    Each copy is a storage round trip the epoch waits for; `train.tensorboard_every` sets how often,
    and `close` makes the last copy.
    """

    def __init__(self, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.local = tempfile.mkdtemp(prefix="simpsons-tb-")
        self.remote = storage.join(cfg.run.storage, cfg.run.name, "tensorboard")
        self.endpoint = cfg.run.s3_endpoint
        self.writer = SummaryWriter(self.local)
        self.every = cfg.train.tensorboard_every

    def scalars(self, metrics: dict, epoch: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, float):
                group = "train" if key.startswith("train_") else "val" if key.startswith("val_") else "misc"
                self.writer.add_scalar(f"{group}/{key.split('_', 1)[-1] if group != 'misc' else key}", value, epoch)
        self.writer.flush()
        if (epoch + 1) % self.every == 0:
            self.copy()

    def copy(self) -> None:
        try:
            storage.upload_dir(self.local, self.remote, self.endpoint)
        except OSError as exc:  # TensorBoard is a convenience: never fail training over it
            _logger.warning("Could not copy TensorBoard logs to %s: %s", self.remote, exc)

    def histograms(self, model: torch.nn.Module, epoch: int) -> None:
        for name, param in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), epoch)
            if param.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", param.grad.detach().float().cpu(), epoch)

    def close(self) -> None:
        self.writer.close()
        self.copy()
        shutil.rmtree(self.local, ignore_errors=True)  # everything in it was copied to storage


# ---------------------------------------------------------------------------------------------
# The driver


def build_trainer(
    cfg: Config, dataset_uri: str, name: str | None = None, callbacks=None, tracking_spec: dict | None = None
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for this config (resources must be resolved: see cluster.prepare_run);
    `tracking_spec` names the MLflow run rank 0 logs into (`tracking.TrackedRun.spec`)."""
    name = name or cfg.run.name
    fs, path = storage.pyarrow_filesystem(cfg.run.storage, cfg.run.s3_endpoint)
    bound_capacity_wait(cfg)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "dataset": dataset_uri,
            "code_version": checkpoint.code_version(),
            "tracking": tracking_spec,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures,
                controller_failure_limit=CONTROLLER_FAILURE_LIMIT,
                max_preemption_failures=cfg.train.max_preemptions,  # reclaimed spot nodes: docs/spot.md
            ),
            callbacks=callbacks,
        ),
    )


def run_trainer(
    cfg: Config, dataset_uri: str, name: str | None = None, callbacks=None, tracking_spec: dict | None = None
) -> ray.train.Result:
    """build_trainer(...).fit(); a worker group that never started becomes a CapacityError."""
    with LaunchWatch(cfg) as launches:
        try:
            return build_trainer(cfg, dataset_uri, name, callbacks, tracking_spec=tracking_spec).fit()
        except ray.train.ControllerError as exc:
            raise capacity_error(cfg, exc, launches.seen) from None


def best_checkpoint(result) -> ray.train.Checkpoint:
    if not result.best_checkpoints:
        raise RuntimeError("The run reported no checkpoint; nothing to export.")
    best, _ = max(result.best_checkpoints, key=lambda pair: pair[1][SCORE])
    return best


def fit(cfg: Config, dataset_uri: str | None = None) -> dict:
    """A whole training job: the driver's checks, data, Ray Train, then the best checkpoint's report
    in `<run.storage>/<run.name>/best/`; returns the reported metrics.

    `dataset_uri` is a packed dataset; by default data.uri, or data.source prepared into the cache
    once the checks have shown the run can happen (a bad run fails in seconds, not after packing).
    """
    from simpsons.cli import resolve_dataset
    from simpsons.report import write_best

    cfg = prepare_run(cfg, dataset_uri)
    dataset_uri = absolute_dataset_uri(dataset_uri or resolve_dataset(cfg))
    if not storage.is_s3(dataset_uri):
        read_manifest(dataset_uri)  # a missing dataset is the user's to fix, not a worker failure to retry
    else:
        check_dataset(dataset_uri, cfg.run.s3_endpoint)  # the same for an incomplete S3 version
    run_uri = storage.join(cfg.run.storage, cfg.run.name)
    checkpoint.check_resume(run_uri, dataset_uri, cfg.run.resume, cfg.run.s3_endpoint)
    config_uri, best_uri = storage.join(run_uri, "config.yaml"), storage.join(run_uri, "best")
    # The MLflow run of this run (none without run.tracking_uri): found again when the run resumes,
    # a new one when its storage holds nothing of it yet.
    tracked = tracking.open_run(cfg, run_uri, fresh=storage.read_bytes(config_uri, cfg.run.s3_endpoint) is None)
    # The resolved config beside the run from its start: a run stopped early still says how it was set.
    storage.write_bytes(config_text(cfg).encode(), config_uri, cfg.run.s3_endpoint)
    _logger.info(
        "Training %s: %d worker(s), %s, %g CPU(s) each, %d epochs -> %s",
        cfg.run.name,
        cfg.train.workers,
        "GPU" if cfg.train.use_gpu else "CPU",
        cfg.train.cpus_per_worker,
        cfg.optim.epochs,
        cfg.run.storage,
    )
    try:
        result = run_trainer(cfg, dataset_uri, tracking_spec=tracked.spec)
    except BaseException:
        tracked.fail()
        raise
    # Read the latest checkpoint before opening the best one: when they are the same checkpoint, a
    # nested as_directory() in one process shares its temp folder and deletes it on the inner exit.
    history = checkpoint.read_history(result.checkpoint)
    with best_checkpoint(result).as_directory() as folder:
        report = write_best(folder, best_uri, cfg, history=history, publish=lambda d: tracked.log_best(d, best_uri))
    tracked.finish(history)  # the epochs MLflow missed (an outage), then FINISHED
    return report
