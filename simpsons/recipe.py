"""The recipe: the one place where a config becomes the objects the engine trains with.

    plan = Plan.of(cfg, device, world)                 # what each epoch does: its side, presets, dtype
    model, criterion, optimizer = build_components(cfg, class_counts, device)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    step = create_train_step(cfg, model, criterion, optimizer, scheduler)

Nothing here trains; simpsons.engine does, with these.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from simpsons.augment import EvalPreset, TrainPreset
from simpsons.config import Config
from simpsons.engine import TrainStep, amp_dtype
from simpsons.loss import FocalLoss, resolve_alpha
from simpsons.model import create_model, is_head, zero_init_residual
from simpsons.weights import load_weights, pretrained


def create_train_preset(cfg: Config, side: int | None = None) -> TrainPreset:
    """The training preset of the config's data section and train.channels_last, at data.train_size
    or at `side` px."""
    d = cfg.data
    return TrainPreset(
        side or d.train_size,
        tuple(d.crop_scale),
        d.rotate,
        d.hflip,
        d.augment,
        cfg.train.channels_last,
        crop_ratio=tuple(d.crop_ratio),
        colour_jitter=tuple(d.colour_jitter),
        greyscale=d.greyscale,
        blur=d.blur,
        blur_sigma=tuple(d.blur_sigma),
        jpeg=d.jpeg,
        jpeg_quality=tuple(d.jpeg_quality),
        erase=d.erase,
        mixup=d.mixup,
        cutmix=d.cutmix,
    )


def create_eval_preset(cfg: Config) -> EvalPreset:
    """The evaluation and inference preset: the whole image at data.train_size."""
    return EvalPreset(cfg.data.train_size, cfg.train.channels_last)


def epoch_sides(cfg: Config) -> tuple[int, ...]:
    """The side (px) each of the optim.epochs epochs trains at: data.train_size, or with
    data.resize_from < 1 the progressive-resizing schedule (resize_from x train_size, a linear
    ramp over the data.resize_ramp fraction of the run in multiples of 8, then train_size)."""
    d, epochs = cfg.data, cfg.optim.epochs
    smallest = min(d.train_size, max(16, 8 * round(d.resize_from * d.train_size / 8)))
    start, end = d.resize_ramp

    def side(epoch: int) -> int:
        progress = epoch / max(1, epochs - 1)
        if d.resize_from >= 1 or progress >= end:
            return d.train_size
        if progress <= start:
            return smallest
        size = smallest + (progress - start) / (end - start) * (d.train_size - smallest)
        return min(d.train_size, 8 * round(size / 8))

    return tuple(side(epoch) for epoch in range(epochs))


@dataclass(frozen=True)
class Plan:
    """What every epoch of a run does, read from the config once: the side each epoch trains at,
    whether it is evaluated, the presets, the autocast dtype and the batches."""

    sides: tuple[int, ...]  # per epoch
    train: TrainPreset  # at data.train_size; train_preset(epoch) resizes it
    eval: EvalPreset
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    batch: int  # training images per step, per rank
    drop_last: bool  # each epoch's last partial training batch left out
    eval_batch: int  # per rank, fixed
    pad_eval: bool  # the last evaluation batch padded to eval_batch: on a GPU (one shape), not on the CPU (waste)
    evaluate_every: int  # epochs between evaluations (and the last epoch)
    tta_flip: bool
    seed: int
    log_every: int  # steps between rank 0's progress lines (0 = none)

    @classmethod
    def of(cls, cfg: Config, device: torch.device, world: int = 1) -> Plan:
        return cls(
            sides=epoch_sides(cfg),
            train=create_train_preset(cfg),
            eval=create_eval_preset(cfg),
            dtype=amp_dtype(cfg.train.precision, device),
            batch=cfg.optim.batch_size // world,
            drop_last=cfg.train.drop_last,
            eval_batch=cfg.train.eval_batch,
            pad_eval=device.type == "cuda",
            evaluate_every=cfg.train.evaluate_every,
            tta_flip=cfg.model.tta_flip,
            seed=cfg.train.seed,
            log_every=cfg.train.log_every,
        )

    def train_preset(self, epoch: int) -> TrainPreset:
        return dataclasses.replace(self.train, train_size=self.sides[epoch])

    def evaluates(self, epoch: int) -> bool:
        """Whether `epoch` ends with an evaluation: every evaluate_every-th epoch and the last."""
        return (epoch + 1) % self.evaluate_every == 0 or epoch == len(self.sides) - 1


def build_components(
    cfg: Config, class_counts: list[int], device: torch.device, prepare: Callable = lambda m: m
) -> tuple[torch.nn.Module, FocalLoss, torch.optim.AdamW]:
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
    """AdamW's parameter groups: the classifier at optim.lr, then, with model.weights loaded, the
    pretrained backbone at optim.lr x optim.backbone_lr_scale (all at optim.lr otherwise), each
    split into the weights that decay by optim.weight_decay and the norm layers' weights and the
    biases (every 1-d parameter), which do not: decaying a BatchNorm scale or a bias towards 0
    only fights the normalisation (torchvision's references, timm, nanoGPT alike). Empty groups are
    left out; the first group is always at optim.lr."""
    tuned = pretrained(cfg.model.weights)
    rates = {True: cfg.optim.lr, False: cfg.optim.lr * cfg.optim.backbone_lr_scale}  # is the head -> lr
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        groups[(not tuned or is_head(cfg.model.arch, name), param.ndim > 1)].append(param)
    return [
        {"params": params, "lr": rates[head], "weight_decay": cfg.optim.weight_decay if decays else 0.0}
        for (head, decays), params in groups.items()
        if params
    ]


def ddp_options(cfg: Config) -> dict:
    """DistributedDataParallel's keyword arguments for this config (Ray's prepare_model passes them on).

    Gradients are all-reduced into buckets of train.ddp_bucket_mb that the gradients are views of.
    Buffers (BatchNorm's running statistics) are not re-broadcast from rank 0 before every
    forward: training uses the batch's statistics, and the running ones are read only by
    engine.evaluate, which broadcasts rank 0's first, and by the checkpoint, which is rank 0's.
    Every rank starts from the same buffers (the same seed, or the same checkpoint)."""
    options = {"gradient_as_bucket_view": True, "static_graph": True, "bucket_cap_mb": cfg.train.ddp_bucket_mb}
    # torch 2.13 renamed broadcast_buffers (now deprecated, with a warning) to forward_sync_buffers.
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    options["forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"] = False
    return options


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


def create_train_step(cfg: Config, model, criterion, optimizer, scheduler) -> TrainStep:
    """The engine's step for this config: its precision, schedule cadence and moving average."""
    device = next(model.parameters()).device
    return TrainStep(
        model,
        criterion,
        optimizer,
        scheduler,
        dtype=amp_dtype(cfg.train.precision, device),
        per_step_schedule=cfg.optim.schedule == "cosine",
        ema_decay=cfg.optim.ema_decay,
        compile=cfg.train.compile,
    )
