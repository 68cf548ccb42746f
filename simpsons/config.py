"""Typed configuration: dataclass defaults, overridden by YAML files and `--set key=value`.

One tree: the training sections and the sweep's `tune:` section (read by jobs/tune.py only).
Every field has a default and a comment (units, meaning). A YAML file or a `--set` may only
override fields that exist, with a value of the field's type; anything else is an error that
names the key; `set_key` and `merge` are the one way to set a dotted key. The resolved config
travels as a plain dict (`to_dict`) into Ray workers and comes back with `from_dict`. Checkpoints
and a run's config.yaml carry the training sections only (`training_dict`, `config_text`) and are
read back by `training_config`, which ignores a `tune` key: a model is evaluated whatever the
sweep schema has become since.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlparse

import yaml

from simpsons.archive import MAX_FILE_BYTES
from simpsons.errors import UserError
from simpsons.names import ARCHS, CACHE_DIR, CLASS_NAMES, RESIDUAL_ARCHS, STORED_SIZE

# The original project's published Google Drive folder; it holds `dataset.tar.xz`.
DRIVE_FOLDER_URL = "https://drive.google.com/drive/folders/10ET4wN898yG2oiRshYxTH95p-Dpoor1S"


# The values a choice field takes; the first of each is its default.
CLASSIFIER_HEADS = ("original", "standard")
SCHEDULES = ("cosine", "plateau")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna", "hyperopt")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be applied; the message names the key."""


@dataclass
class DataConfig:
    # Where the raw images come from: a Drive folder/file URL, a local folder or archive, an
    # http(s) URL. Used when `uri` is empty: the job prepares the packed set into `cache_dir`.
    source: str = DRIVE_FOLDER_URL
    # A packed dataset (folder with manifest.json): local path or s3://bucket/.../<name>/<version>.
    uri: str = ""
    # Node-local cache for downloads, unpacked archives and packed datasets.
    cache_dir: str = CACHE_DIR
    # Side (px) of the square uint8 images stored by `pack`; training crops from these.
    stored_size: int = STORED_SIZE
    # Side (px) of the images the network sees in training and evaluation.
    train_size: int = 128
    # Progressive resizing (FFCV's ImageNet recipe): epochs before the first `resize_ramp` fraction
    # of the run train at `resize_from` x train_size, epochs after the second at train_size,
    # linearly in between (sides in multiples of 8). Evaluation is always at train_size. Cheaper
    # early epochs buy more epochs in the same time. 1 = off: every epoch at train_size.
    # 0.625: more epochs in the same time scored higher than fewer at full size (bench/RESULTS.md).
    resize_from: float = 0.625
    resize_ramp: list = field(default_factory=lambda: [0.4, 0.85])
    # Random resized crop: range of the crop's area as a fraction of the stored image. Light, as
    # rotate and model.dropout are: stronger regularisation underfits short runs (bench/RESULTS.md).
    crop_scale: list = field(default_factory=lambda: [0.75, 1.0])
    # Random rotation range in degrees (uniform in [-rotate, rotate]).
    rotate: float = 10.0
    # Random horizontal flip with probability 0.5.
    hflip: bool = True
    # Random resized crop: range of the crop's aspect ratio (width / height), log-uniform.
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    # Robustness augmentations (simpsons.augment), all off by default until measured
    # (configs/robust.yaml turns on the ones expected to pay; docs/training.md lists them).
    # Colour jitter strengths [brightness, contrast, saturation, hue], per image as torchvision's
    # ColorJitter: factors uniform in [1 - s, 1 + s], hue shift in [-hue, hue] turns (hue <= 0.5).
    colour_jitter: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    # Probability (0-1) an image is turned grey.
    greyscale: float = 0.0
    # Probability (0-1) an image is blurred (before the crop is resized to the network's side) by a
    # Gaussian of sigma uniform in blur_sigma, as a fraction of the stored side (0.01 = 1.44 px at
    # 144 px, 0.72 px at 72: the same blur of the content whatever the stored size).
    blur: float = 0.0
    blur_sigma: list = field(default_factory=lambda: [0.005, 0.025])
    # Probability (0-1) an image goes through a JPEG-like degradation (8x8 DCT quantisation with
    # chroma subsampling, on the device) at a quality uniform in jpeg_quality (1-100).
    jpeg: float = 0.0
    jpeg_quality: list = field(default_factory=lambda: [10, 60])
    # Probability (0-1) an image has a random box (2-33 % of it) set to the mean colour.
    erase: float = 0.0
    # Mixup and cutmix: each image mixed with another by a share ~ Beta(alpha, alpha), its target
    # mixed alike; the Beta's alpha, 0 = off. Both on: each image takes one of them at even odds.
    mixup: float = 0.0
    cutmix: float = 0.0
    # Turn online augmentation off entirely (the original project's recipe).
    augment: bool = True
    # Processes that decode images while packing (0 = one per CPU).
    pack_workers: int = 0
    # Class names in label order: a list (default: the original project's 42 characters) or
    # "auto" (the source tree's class folders, sorted). The packed dataset and every checkpoint
    # carry the list, so evaluation and prediction never depend on this setting.
    classes: Any = field(default_factory=lambda: list(CLASS_NAMES))
    # Largest image file (bytes) that is unpacked or read; a larger archive member or file is
    # left out unread and listed in report.json. Real photos are under 1 MB.
    max_image_bytes: int = MAX_FILE_BYTES
    # Largest share (0-1) of a GPU's free memory the packed train + val splits may take to stay
    # resident on it; beyond that they stay in host memory (the page cache, shared by the node's
    # ranks; refused if they do not fit the host's available memory) and each batch is gathered
    # into a pinned buffer and copied over without blocking. Half leaves the rest to the model,
    # activations and cuDNN.
    resident_share: float = 0.5


@dataclass
class ModelConfig:
    # "original": the original project's residual network (the default); or a torchvision
    # architecture: resnet18, resnet50, efficientnet_b0, convnext_tiny, mobilenet_v3_large.
    arch: str = "original"
    # Starting weights: "none", "imagenet" (torchvision's, for a torchvision arch; downloaded once
    # per node into data.cache_dir), or a local path / s3:// URI of a state dict (or a checkpoint.pt).
    weights: str = "none"
    # The original network's classifier: "original" is Linear-BN-Dropout-ReLU-Linear exactly as
    # published; "standard" is Linear-BN-ReLU-Dropout. (torchvision architectures keep their own.)
    head: str = CLASSIFIER_HEADS[0]
    # Dropout probability in the classifier head; light, see data.crop_scale.
    dropout: float = 0.2
    # Start every residual block as the identity: the last BatchNorm of each residual branch starts
    # at weight 0 (Goyal et al. 2017; torchvision's zero_init_residual), so the first steps train a
    # shallow network whose signal passes the blocks unchanged. Original network and ResNets.
    zero_init_residual: bool = False
    # Test-time flip: evaluation, evaluate.py, predict.py and the exported model average the
    # logits of each image and its mirror image (twice the inference cost).
    tta_flip: bool = False


@dataclass
class LossConfig:
    # Focal loss weight: null (1 for every class), a number, a list of 42 numbers, or "auto"
    # (inverse square root of the training-set class frequency, mean weight per image = 1).
    alpha: Any = "auto"
    # The class-balance exponent p of alpha "auto": alpha_c proportional to count_c^-p, from 0
    # (every class alike) through 0.5 (inverse square root, the default) to 1 (inverse frequency).
    alpha_power: float = 0.5
    # Focal exponent; 0 with alpha=1 is plain cross-entropy.
    gamma: float = 1.5
    # Label smoothing epsilon (0 = off).
    label_smoothing: float = 5e-2


@dataclass
class OptimConfig:
    # Training epochs (full passes over the training split).
    epochs: int = 30
    # Global batch size across all workers (each worker takes batch_size // workers). 64 suits
    # the CPU; on GPUs give each worker 128 or more (configs/cluster.yaml): at 32 images a GPU
    # spends about as long launching kernels as computing them.
    batch_size: int = 64
    # Peak learning rate for AdamW at the global batch size above. With another batch, scale it
    # by the square root of the ratio (the rule for Adam-type optimizers): lr = 3e-3 x
    # sqrt(batch_size / 64), e.g. 0.012 at 1024; a starting point, not a tuned value.
    lr: float = 3e-3
    # AdamW decoupled weight decay.
    weight_decay: float = 2e-2
    # With model.weights loaded, the pretrained backbone learns at lr x this and the new classifier
    # at lr: full-rate updates to weights that already work would undo what they learnt while the
    # random classifier's gradients are still large (the usual fine-tuning practice). Without
    # loaded weights every parameter learns at lr.
    backbone_lr_scale: float = 0.1
    # Exponential moving average of the weights, updated every step with this decay (0 = off;
    # 0.999 averages over roughly the last 1,000 steps). When on, the averaged weights are what
    # is evaluated, ranked, exported and served; the raw weights are checkpointed beside them
    # (training resumes from those) and their scores reported as raw_val_*.
    ema_decay: float = 0.0
    # "cosine": linear warm-up then cosine decay per step; "plateau": the original project's
    # ReduceLROnPlateau on validation loss (factor 0.5, patience 4).
    schedule: str = SCHEDULES[0]
    # Warm-up length in epochs for the cosine schedule.
    warmup_epochs: float = 1.0
    # ReduceLROnPlateau factor and patience (epochs), used with schedule = "plateau".
    plateau_factor: float = 0.5
    plateau_patience: int = 4


@dataclass
class TrainConfig:
    # Ray Train workers (one process each; one GPU each when use_gpu).
    workers: int = 1
    # Train on GPUs, one per worker: true, false, or "auto" (GPUs if the Ray cluster has any).
    use_gpu: Any = "auto"
    # CPUs reserved per worker (fractions allowed, e.g. 0.5 on a 2-core test machine);
    # 0 = share the cluster's CPUs evenly between the workers. Also sets torch's thread count.
    cpus_per_worker: float = 0.0
    # "auto" (bf16 on the CPU and on GPUs with native bf16, compute capability 8.0+; fp16 with
    # a GradScaler on older GPUs), "bf16", "fp16" or "fp32".
    precision: str = PRECISIONS[0]
    # Use the channels_last memory layout for activations and weights.
    channels_last: bool = True
    # Seed for weights, shuffling and augmentation.
    seed: int = 0
    # Keep this many best checkpoints (by validation macro-F1) in storage.
    checkpoints_to_keep: int = 2
    # Write weight and gradient histograms to TensorBoard every N epochs (0 = never).
    histogram_every: int = 5
    # Ray resources each worker asks for besides CPU and GPU, e.g. {"A10G": 1} where node types
    # advertise such a custom resource: workers then land only on those nodes, and the driver
    # checks the cluster can hold them like CPUs and GPUs.
    resources_per_worker: Any = field(default_factory=dict)
    # Restarts of the worker group after a worker failure before the run fails.
    max_failures: int = 3
    # Seconds the run waits for the nodes its workers need each time it starts them (at the
    # start and after a lost node) before it stops with a sentence naming the missing capacity.
    # On an autoscaling cluster this covers booting GPU nodes from zero (minutes); a GPU quota
    # of 0 or a zone without capacity ends here instead of waiting for ever.
    capacity_timeout_s: float = 1200.0
    # Log progress every N training steps on rank 0.
    log_every: int = 20
    # Copy TensorBoard logs to run.storage every N epochs and after the last (each copy is a
    # storage round trip the epoch waits for).
    tensorboard_every: int = 5
    # Also save a checkpoint every N training steps, not only at each epoch's end (0 = off). A run
    # resumed from one continues that epoch at the next batch, with the same batches and random draws.
    checkpoint_every_steps: int = 0
    # Ask Ray every N training steps whether a node of the run is being preempted (a spot reclaim
    # drained with the preemption reason: docs/spot.md); on a notice every rank takes part in a
    # just-in-time checkpoint. Each check is a barrier of the workers' host threads (a Ray actor
    # round trip, about a millisecond), never a GPU sync; 0 = never check.
    preemption_check_steps: int = 10
    # Restarts after a preempted node before the run fails, counted apart from max_failures.
    max_preemptions: int = 10
    # DDP gradient bucket size (MiB). Backward fills the buckets in reverse layer order and each
    # is all-reduced as soon as it is full; the last one (the first layers) only after backward
    # ends. Small enough that little of the original network's gradients waits for the end of
    # backward, large enough for few launches (bench/RESULTS.md, Scaling).
    ddp_bucket_mb: float = 5.0
    # torch.compile the network (nn.Module.compile: in place, the checkpoint's keys unchanged). Its
    # first steps at each image side compile for tens of seconds (72 s on the 2-core CPU) for +6 %
    # there (bench/RESULTS.md), hence off by default; on a GPU, whose small steps are bound by kernel
    # launches, bench/device_check.py measures what it gains.
    compile: bool = False
    # Evaluate the validation split every N epochs and after the last (1 = every epoch).
    # Checkpoints are still saved every epoch; those of an epoch without evaluation carry no val_*
    # figures and never rank as the best (their val_macro_f1 is -inf, as a mid-epoch
    # checkpoint's), and sweeps rank them by the last evaluated score. With optim.schedule=plateau
    # the patience counts evaluations.
    evaluate_every: int = 1
    # Images per evaluation batch on each worker, whatever the training batch: one fixed shape
    # (on a GPU the last batch is padded to it), so cuDNN and torch.compile tune evaluation once.
    eval_batch: int = 256
    # Leave out each epoch's last, partial training batch (its images train in other epochs, as
    # the permutation changes): every step of an epoch has one shape, so cuDNN (and torch.compile)
    # tune one set of kernels per image side instead of two.
    drop_last: bool = True


@dataclass
class RunConfig:
    # Run name; a run restarted with the same name and storage resumes from its last checkpoint.
    name: str = "simpsons"
    # Where checkpoints, TensorBoard logs and best/ go: a local folder or s3://bucket/prefix.
    storage: str = "./runs"
    # S3-compatible endpoint (MinIO, R2, a test server); empty = AWS or $AWS_ENDPOINT_URL.
    s3_endpoint: str = ""
    # Resume a run found under the same storage and name (true), or start it over (false): the
    # earlier run's folder is then moved aside to <name>.replaced-<UTC time>, nothing deleted.
    resume: bool = True
    # MLflow tracking server, e.g. http://mlflow.internal:5000 (needs the `mlflow` extra); empty =
    # $MLFLOW_TRACKING_URI, and no tracking when that is unset too. See docs/tracking.md.
    tracking_uri: str = ""
    # MLflow experiment the run (or a sweep's parent and trials) is logged in; empty = run.name
    # (tune.name for a sweep), created when missing.
    experiment: str = ""


@dataclass
class SweepConfig:
    """The `tune:` section: how a Ray Tune sweep samples, schedules and places its trials.

    Only jobs/tune.py reads it; in a single run's config it is carried along unused, and no
    checkpoint or run folder keeps it (the sweep's own sweep.yaml does).
    """

    # Sweep name: the folder under run.storage that holds every trial, best/ and trials.csv.
    name: str = "sweep"
    # Trials to sample from the space (with `grid` entries: samples per grid point).
    num_samples: int = 8
    # Trials running at once; 0 = as many as the cluster's CPUs (and GPUs) hold.
    max_concurrent_trials: int = 0
    # CPUs held by each trial's driver (the Tune function that runs the TorchTrainer), on top of
    # its Train workers' train.workers * train.cpus_per_worker. Fractions allowed; must be > 0.
    trial_cpus: float = 1.0
    # "asha": stop trials whose val_macro_f1 falls behind at a rung; "fifo": run all to the end.
    scheduler: str = SCHEDULERS[0]
    # ASHA: epochs every trial runs before it can be stopped (the first rung).
    grace_period: int = 1
    # ASHA: rungs at grace_period * rf^k epochs; at each, trials below the top 1/rf are stopped.
    reduction_factor: float = 2.0
    # "random" (Tune's random and grid search), "optuna" or "hyperopt" (need those packages).
    search: str = SEARCHES[0]
    # Seed of the search algorithm's sampling.
    seed: int = 0
    # Config key -> {uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}
    # (inclusive), {choice: [values]} or {grid: [values]} (every value, num_samples times each).
    # `--set tune.space.optim.lr={...}` sets one entry, `--set tune.space.optim.lr=null` removes it.
    space: Any = field(
        default_factory=lambda: {
            "optim.lr": {"loguniform": [3e-4, 1e-2]},
            "loss.gamma": {"uniform": [0.0, 3.0]},
            "loss.alpha": {"choice": ["auto", 1.0]},
        }
    )

    def validate(self) -> SweepConfig:
        _choice("tune.scheduler", self.scheduler, SCHEDULERS)
        _choice("tune.search", self.search, SEARCHES)
        if self.num_samples < 1:
            raise ConfigError(f"tune.num_samples must be at least 1, not {self.num_samples}.")
        if self.max_concurrent_trials < 0:
            raise ConfigError(
                f"tune.max_concurrent_trials must be 0 (fit the cluster) or more, not {self.max_concurrent_trials}."
            )
        if not self.trial_cpus > 0:
            raise ConfigError(
                f"tune.trial_cpus must be more than 0 (Ray refuses a zero-CPU trial), not {self.trial_cpus}."
            )
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("tune.grace_period must be at least 1 and tune.reduction_factor more than 1.")
        if not isinstance(self.space, dict) or not self.space:
            raise ConfigError(
                "tune.space must map config keys to ranges, e.g. {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}."
            )
        for key, spec in self.space.items():
            space_entry(key, spec)
        return self


# The kinds of range a tune.space entry may take.
SPACE_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


def space_entry(key: str, spec: Any) -> tuple[str, list]:
    """(kind, arguments) of the tune.space entry for config key `key`; numbers of a range as numbers."""
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
        raise ConfigError(
            f"tune.space.{key} must be one of {{uniform: [low, high]}}, {{loguniform: [low, high]}}, "
            f"{{randint: [low, high]}}, {{choice: [values]}} or {{grid: [values]}}, not {spec!r}."
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"tune.space.{key}: {kind} needs a list, e.g. {{{kind}: [1, 2]}}, not {args!r}.")
    if kind in ("uniform", "loguniform", "randint"):
        try:
            # YAML reads 1e-4 (no dot) as text; accept it as the number it was meant to be.
            low, high = (int(a) if kind == "randint" else float(a) for a in args)
        except (TypeError, ValueError):
            raise ConfigError(f"tune.space.{key}: {kind} needs two numbers [low, high], not {args!r}.") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            positive = " and low > 0" if kind == "loguniform" else ""
            raise ConfigError(f"tune.space.{key}: {kind} needs low < high{positive}, not {args!r}.")
        args = [low, high]
    return kind, args


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # The sweep settings (jobs/tune.py); a config file's `tune:` section.
    tune: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> Config:
        _choice("model.head", self.model.head, CLASSIFIER_HEADS)
        _choice("model.arch", self.model.arch, ARCHS)
        if self.model.zero_init_residual and self.model.arch not in RESIDUAL_ARCHS:
            raise ConfigError(
                f"model.zero_init_residual applies to {', '.join(RESIDUAL_ARCHS)}, not {self.model.arch}; "
                "set it to false."
            )
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("train.precision", self.train.precision, PRECISIONS)
        alpha = self.loss.alpha
        if not (alpha is None or alpha == "auto" or isinstance(alpha, (int, float, list))):
            raise ConfigError(
                f"loss.alpha must be null, a number, a list of per-class numbers or 'auto', not {alpha!r}."
            )
        weights = alpha if isinstance(alpha, list) else [alpha] if isinstance(alpha, (int, float)) else []
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights):
            raise ConfigError(f"loss.alpha weights must be numbers of 0 or more, not {alpha!r}.")
        extra = self.train.resources_per_worker
        if not (
            isinstance(extra, dict)
            and all(
                isinstance(k, str)
                and k not in ("CPU", "GPU")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and v > 0
                for k, v in extra.items()
            )
        ):
            raise ConfigError(
                f"train.resources_per_worker must map custom Ray resource names to positive amounts, "
                f"e.g. {{A10G: 1}} (CPU and GPU have their own keys), not {extra!r}."
            )
        if self.train.use_gpu not in (True, False, "auto"):
            raise ConfigError(f"train.use_gpu must be true, false or 'auto', not {self.train.use_gpu!r}.")
        _check_bounds(self)
        _check_classes(self.data.classes)
        if self.optim.batch_size < self.train.workers:
            raise ConfigError(
                f"optim.batch_size ({self.optim.batch_size}) is the global batch and must be at least "
                f"train.workers ({self.train.workers})."
            )
        if self.data.train_size > self.data.stored_size:
            raise ConfigError(
                f"data.train_size ({self.data.train_size}) must not exceed data.stored_size "
                f"({self.data.stored_size}): training crops from the stored images."
            )
        ramp = self.data.resize_ramp
        if not (_two_numbers(ramp) and 0 <= ramp[0] <= ramp[1] <= 1):
            raise ConfigError(f"data.resize_ramp must be two fractions of the run 0 <= start <= end <= 1, not {ramp}.")
        scale = self.data.crop_scale
        if not (_two_numbers(scale) and 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"data.crop_scale must be two numbers 0 < low <= high <= 1, not {self.data.crop_scale}.")
        _check_augmentations(self.data)
        self.tune.validate()
        return self


def _check_augmentations(d: DataConfig) -> None:
    ratio = d.crop_ratio
    if not (_two_numbers(ratio) and 0 < ratio[0] <= ratio[1]):
        raise ConfigError(
            f"data.crop_ratio must be two aspect ratios 0 < low <= high, e.g. [0.75, 1.333], not {ratio}."
        )
    jitter = d.colour_jitter
    if not (_numbers(jitter, 4) and min(jitter) >= 0 and jitter[3] <= 0.5):
        raise ConfigError(
            "data.colour_jitter must be four strengths [brightness, contrast, saturation, hue], each 0 or "
            f"more and hue at most 0.5, not {jitter}."
        )
    sigma = d.blur_sigma
    if not (_two_numbers(sigma) and 0 < sigma[0] <= sigma[1] <= 0.1):
        raise ConfigError(
            f"data.blur_sigma must be two sigmas as fractions of the image side 0 < low <= high <= 0.1, not {sigma}."
        )
    quality = d.jpeg_quality
    if not (_two_numbers(quality) and 1 <= quality[0] <= quality[1] <= 100):
        raise ConfigError(f"data.jpeg_quality must be two JPEG qualities 1 <= low <= high <= 100, not {quality}.")


def _two_numbers(value: Any) -> bool:
    """Whether a config value is a pair of numbers (booleans are not numbers here)."""
    return _numbers(value, 2)


def _numbers(value: Any, count: int) -> bool:
    """Whether a config value is a list of `count` numbers (booleans are not numbers here)."""
    return len(value) == count and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# Bounds of every numeric value: key -> (lowest, highest, whether the lowest itself is allowed).
# None is no bound. Checked before anything starts, so a bad value never reaches Ray.
_AT_LEAST_0 = (0, None, True)
_AT_LEAST_1 = (1, None, True)
_ABOVE_0 = (0, None, False)
_FRACTION = (0, 1, True)
_BOUNDS = {
    "data.stored_size": (16, 4096, True),
    "data.train_size": (16, 4096, True),
    "data.resize_from": (0, 1, False),
    "data.rotate": (0, 180, True),
    "data.pack_workers": _AT_LEAST_0,
    "data.max_image_bytes": _AT_LEAST_1,
    "data.resident_share": _FRACTION,
    "data.greyscale": _FRACTION,
    "data.blur": _FRACTION,
    "data.jpeg": _FRACTION,
    "data.erase": _FRACTION,
    "data.mixup": _AT_LEAST_0,
    "data.cutmix": _AT_LEAST_0,
    "model.dropout": _FRACTION,
    "loss.gamma": _AT_LEAST_0,
    "loss.alpha_power": _FRACTION,
    "loss.label_smoothing": _FRACTION,
    "optim.epochs": _AT_LEAST_1,
    "optim.batch_size": _AT_LEAST_1,
    "optim.lr": _ABOVE_0,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.backbone_lr_scale": _FRACTION,
    "optim.ema_decay": _FRACTION,
    "optim.warmup_epochs": _AT_LEAST_0,
    "optim.plateau_factor": (0, 1, False),
    "optim.plateau_patience": _AT_LEAST_0,
    "train.workers": _AT_LEAST_1,
    "train.cpus_per_worker": _AT_LEAST_0,
    "train.seed": _AT_LEAST_0,
    "train.checkpoints_to_keep": _AT_LEAST_1,
    "train.histogram_every": _AT_LEAST_0,
    "train.max_failures": _AT_LEAST_0,
    "train.capacity_timeout_s": _ABOVE_0,
    "train.log_every": _AT_LEAST_0,
    "train.checkpoint_every_steps": _AT_LEAST_0,
    "train.preemption_check_steps": _AT_LEAST_0,
    "train.max_preemptions": _AT_LEAST_0,
    "train.tensorboard_every": _AT_LEAST_1,
    "train.ddp_bucket_mb": _ABOVE_0,
    "train.evaluate_every": _AT_LEAST_1,
    "train.eval_batch": _AT_LEAST_1,
}


def _check_bounds(cfg: Config) -> None:
    for key, (low, high, low_allowed) in _BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        too_low = low is not None and (value < low or (value == low and not low_allowed))
        if too_low or (high is not None and value > high):
            if high is None:
                want = f"at least {low}" if low_allowed else f"more than {low}"
            else:
                want = f"from {low} to {high}" if low_allowed else f"more than {low} and at most {high}"
            raise ConfigError(f"{key} must be {want}, not {value}; set it with --set {key}=<value>.")


def _check_classes(classes: Any) -> None:
    if classes == "auto":
        return
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c.strip() for c in classes)):
        raise ConfigError(f"data.classes must be 'auto' or a list of at least 2 class names, not {classes!r}.")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ConfigError(f"data.classes names {', '.join(twice)} more than once; list each class once.")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key} must be one of {', '.join(valid)}; got {value!r}.")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = Config()
    merge(cfg, values)
    return cfg.validate()


SWEEP_SECTION = "tune"


def training_dict(cfg: Config) -> dict:
    """The training sections (all but the sweep's `tune:`): what checkpoints and run folders keep."""
    return {section: values for section, values in to_dict(cfg).items() if section != SWEEP_SECTION}


def training_config(values: dict) -> Config:
    """The config of a checkpoint or a run folder; a `tune` section (checkpoints once kept one) is
    ignored, so that reading a model never validates the sweep schema."""
    return from_dict({section: v for section, v in values.items() if section != SWEEP_SECTION})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then each `section.key=value` override in order."""
    cfg = Config()
    if path is not None:
        merge(cfg, read_config_file(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"Override {item!r} must look like section.key=value, e.g. optim.lr=0.001.")
        set_key(cfg, key.strip(), yaml.safe_load(raw))
    return cfg.validate()


def load_sweep(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A sweep's config: `load_config`'s layers (the file's training sections and its `tune:`
    section, then `--set`, `tune.*` keys included), then `check_sweep`."""
    cfg = load_config(path, overrides)
    check_sweep(cfg)
    return cfg


def check_sweep(cfg: Config) -> None:
    """What only a sweep needs of a config, checked before any trial starts: every value of every
    tune.space entry makes a valid config, and ASHA's first rung comes within optim.epochs."""
    for key, spec in cfg.tune.space.items():
        kind, args = space_entry(key, spec)
        for value in args:
            try:
                with_overrides(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key} ({kind} {args}): {exc}") from None
    if cfg.tune.scheduler == "asha" and cfg.tune.grace_period > cfg.optim.epochs:
        raise ConfigError(
            f"tune.grace_period ({cfg.tune.grace_period}) must not exceed optim.epochs ({cfg.optim.epochs})."
        )


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of cfg with dotted keys set, e.g. {"optim.lr": 1e-3}; cfg is left as it was."""
    changed = copy.deepcopy(cfg)
    for dotted, value in values.items():
        set_key(changed, dotted, value)
    return changed.validate()


def read_config_file(path: str | Path) -> dict:
    """The mapping of sections in a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass one of the files in configs/.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections, e.g. 'optim: {{lr: 0.001}}'.")
    return values


def config_text(cfg: Config) -> str:
    """The training sections as YAML that load_config reads back (a run's config.yaml, best/config.yaml)."""
    return yaml.safe_dump(training_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))


# The config fields that name a place on disk (or an s3:// / http(s) / Drive URI).
PATH_KEYS = ("data.source", "data.uri", "data.cache_dir", "run.storage", "model.weights")
# Values of those keys that name no place.
NOT_PATHS = ("none", "imagenet")


def resolve_paths(cfg: Config, cwd: str | Path | None = None) -> Config:
    """A copy of cfg whose relative local paths are absolute, resolved against `cwd` (default: ours).

    Ray Train runs every worker, and Tune every trial, in a folder of its own, so `./runs` would
    mean a different place there than where the user typed it; the driver settles it before the
    config travels. URIs stay as they are, and so does a leading `~`: it means the home folder of
    whichever node reads it (the node-local cache), not the driver's.
    """
    cwd = Path(cwd or Path.cwd())
    nested = to_dict(cfg)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = nested[section][key]
        if value and value not in NOT_PATHS and is_relative_path(value):
            nested[section][key] = str((cwd / value).resolve())
    return from_dict(nested)


def is_relative_path(value: str) -> bool:
    scheme = urlparse(value).scheme
    if len(scheme) > 1:  # s3://, http(s)://, file:// (absolute by definition); one letter is a drive
        return False
    return not (value.startswith("~") or Path(value).is_absolute())


def merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Set every key of `values` on `obj` (a Config or one of its sections) as `set_key` does;
    a config file's mapping of sections goes in whole. `prefix` only names the full key in errors."""
    for key, value in values.items():
        set_key(obj, str(key), value, prefix)


def set_key(obj: Any, dotted: str, value: Any, prefix: str = "") -> None:
    """Set the dotted key (relative to `obj`, a Config or one of its sections), e.g. "optim.lr".

    An unknown key or a value of the wrong type raises ConfigError naming the full key. A section
    takes a mapping, merged into it. Below a mapping-valued field the rest of the key names one
    entry, dots and all: "tune.space.optim.lr" sets the space's "optim.lr" entry, and None removes
    it. Ranges and choices are checked by `Config.validate`, once every key is set.
    """
    parts = dotted.split(".")
    full = f"{prefix}{dotted}"
    target = obj
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            raise ConfigError(f"Unknown config key '{full}': '{part}' is not one of {', '.join(fields)}.")
        current = getattr(target, part)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(current):
            if last:
                if not isinstance(value, dict):
                    raise ConfigError(f"Config key '{full}' is a section; give it a mapping, not {value!r}.")
                merge(current, value, prefix=f"{full}.")
                return
            target = current
            continue
        if not last:
            if isinstance(current, dict):
                entry = ".".join(parts[depth + 1 :])
                kept = {k: v for k, v in current.items() if k != entry}
                setattr(target, part, kept if value is None else {**kept, entry: value})
                return
            raise ConfigError(f"Unknown config key '{full}': '{part}' is a value, not a section.")
        hint = typing.get_type_hints(type(target))[part]
        setattr(target, part, _coerce(full, value, hint))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, list):
            return value
    elif typing.get_origin(hint) in (Union, types.UnionType):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"Config key '{key}' must be of type {name}, not {type(value).__name__} ({value!r}).")
