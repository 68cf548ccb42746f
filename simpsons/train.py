"""Ray Train loop: resident data, batched augmentation, mixed precision, DDP, per-epoch reports.

`train_loop_per_worker(config)` runs in every Ray Train worker; `build_trainer` wires it to a
TorchTrainer (also used per trial by the Tune sweep) and `fit` runs a whole job: train, then
export the best checkpoint with its metrics to `<storage>/<run name>/best/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from simpsons import storage
from simpsons.augment import eval_transform, train_transform
from simpsons.config import Config, ConfigError, from_dict, resolve_paths, to_dict
from simpsons.data import ResidentSplit, data_placement
from simpsons.dataset import check_dataset, load_packed, local_dataset_dir, read_manifest
from simpsons.inference import CHECKPOINT_FORMAT
from simpsons.loss import FocalLoss, resolve_alpha
from simpsons.metrics import classification_report, confusion_matrix
from simpsons.model import create_model

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
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


def worker_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """The seed of one random stream of one rank in one epoch (0: augmentation, 1: dropout).

    Every rank draws its own augmentations and dropout masks; with one seed on all ranks, DDP would
    average gradients of identically masked networks and waste the workers' diversity.
    """
    return ((seed * 1_000_003 + epoch) * 997 + rank) * 2 + stream


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
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.per_step_schedule = cfg.optim.schedule == "cosine"
        # Under DDP with gradient_as_bucket_view the gradients are views into the all-reduce buckets;
        # setting them to None would make autograd allocate fresh ones that DDP copies back every step.
        self.set_to_none = not isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # images: (B, S, S, 3) uint8 -> (B, 3, T, T) float, T = data.train_size
        d = self.cfg.data
        if not d.augment:
            return eval_transform(images, d.train_size)
        return train_transform(images, d.train_size, d.crop_scale, d.rotate, d.hflip, generator)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs(images, generator)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(x)  # (B, C)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            self.scheduler.step()
        return loss.detach(), logits.detach()


def build_components(cfg: Config, class_counts: list[int], device: torch.device, prepare=lambda m: m):
    """Model (prepared for DDP by `prepare`), focal loss, AdamW, scheduler and the step."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(len(class_counts), cfg.model.head, cfg.model.dropout).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare(model)
    criterion = FocalLoss(resolve_alpha(cfg.loss.alpha, class_counts), cfg.loss.gamma, cfg.loss.label_smoothing).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda"
    )
    return model, criterion, optimizer


class EpochSums:
    """Training loss and accuracy summed on the device over an epoch: read once, at its end.

    The image count is kept on the host, where it is known: a `torch.tensor(n, device="cuda")` per
    step would be a blocking host->device copy that drains the GPU's queue.
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct
        self.images = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums += torch.stack([loss.double() * len(labels), (logits.argmax(1) == labels).sum().double()])
        self.images += len(labels)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, criterion, split: ResidentSplit, cfg: Config, device: torch.device, num_classes: int,
             rank: int = 0, world: int = 1) -> tuple[torch.Tensor, float]:
    """(confusion matrix (C, C) summed over all ranks, mean loss over the whole split)."""
    # The bare module, not the DDP wrapper: the wrapper's first forward after training broadcasts
    # the BatchNorm buffers, a collective that a rank with no validation batch (fewer images than
    # ranks) never joins, pairing the others' broadcast with its all_reduce below: a hang. Every
    # rank broadcasts here instead, so all evaluate with rank 0's statistics, as its checkpoint holds.
    model = getattr(model, "module", model)
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    model.eval()
    dtype = amp_dtype(cfg.train.precision, device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    batch = max(1, cfg.optim.batch_size // world) * 2
    for images, labels in split.eval_batches(batch, rank, world):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(eval_transform(images, cfg.data.train_size))
        loss_sum += criterion(logits, labels).double() * len(labels)
        cm += confusion_matrix(labels, logits.argmax(1), num_classes)
    if world > 1:
        dist.all_reduce(cm)
        dist.all_reduce(loss_sum)
    model.train()
    total = int(cm.sum())
    return cm, float(loss_sum) / max(1, total)


# ---------------------------------------------------------------------------------------------
# The checkpoint


def _to_cpu(value):
    """`value` with every tensor in it copied to the CPU (dicts, lists and tuples walked through)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def checkpoint_state(model, optimizer, scheduler, scaler, **extra) -> dict:
    """The checkpoint's plain dict, every tensor on the CPU.

    CUDA tensors in it would make a plain `torch.load` fail on a machine without that GPU; the
    loader moves them to its own device (`restore_state`, `inference.load_checkpoint`).
    """
    return _to_cpu({
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "format": CHECKPOINT_FORMAT,  # checked on load (inference.read_checkpoint_state)
        **extra,
    })


def restore_state(state: dict, model, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint into this run's objects, whose settings may differ from the saving run's."""
    getattr(model, "module", model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # Optimizer state keeps the memory layout it was saved with; fused AdamW on CUDA refuses state
    # whose strides differ from its parameter's (a run resumed with train.channels_last flipped).
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    scheduler.load_state_dict(state["scheduler"])
    # A disabled GradScaler (bf16, fp32) saves {}, which an enabled one refuses: a run resumed with
    # train.precision=fp16 starts its loss scale afresh instead.
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------------------------
# The Ray Train worker


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    dataset_uri = config["dataset"]
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
    counts = manifest["splits"]["train"]["class_counts"]
    arrays = {name: load_packed(dataset_dir, name) for name in ("train", "val")}
    on_device, placement = data_placement(sum(a.nbytes for pair in arrays.values() for a in pair), device,
                                          cfg.data.resident_share)
    if rank == 0:  # every rank decides for its own device; one line in the log is enough
        print(f"Data: train + val {placement}.", flush=True)
    train_split, val_split = (ResidentSplit(*arrays[name], device=device, on_device=on_device) for name in ("train", "val"))
    del arrays
    per_worker_batch = cfg.optim.batch_size // world
    steps_per_epoch = train_split.steps_per_epoch(per_worker_batch, world)

    ddp_kwargs = {"gradient_as_bucket_view": True, "static_graph": True, "bucket_cap_mb": cfg.train.ddp_bucket_mb}
    model, criterion, optimizer = build_components(
        cfg, counts, device,
        prepare=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs),
    )
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    step = TrainStep(model, criterion, optimizer, scheduler, cfg, device)
    bare_model = getattr(model, "module", model)

    start_epoch, best_score, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        restore_state(state, model, optimizer, scheduler, step.scaler)
        start_epoch, best_score, history = state["epoch"] + 1, state["best_score"], state["history"]
        if rank == 0:
            print(f"Resuming from the checkpoint of epoch {state['epoch']}; continuing at epoch {start_epoch}.", flush=True)

    writer = _TensorBoard(cfg) if rank == 0 else None
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(worker_seed(cfg.train.seed, epoch, rank, 0))
        torch.manual_seed(worker_seed(cfg.train.seed, epoch, rank, 1))  # dropout masks
        sums = EpochSums(device)
        for i, (images, labels) in enumerate(train_split.train_batches(epoch, per_worker_batch, cfg.train.seed, rank, world)):
            loss, logits = step(images, labels, generator)
            sums.add(loss, logits, labels)
            if rank == 0 and cfg.train.log_every and (i + 1) % cfg.train.log_every == 0:
                rate = sums.images * world / (time.perf_counter() - started)
                print(f"epoch {epoch + 1}/{cfg.optim.epochs} step {i + 1}/{steps_per_epoch} "
                      f"loss {float(loss):.3f} {rate:.0f} img/s", flush=True)
        synchronize(device)  # nothing in the steps waits for the GPU: the time must
        train_time = time.perf_counter() - started
        if writer and cfg.train.histogram_every and (epoch + 1) % cfg.train.histogram_every == 0:
            writer.histograms(bare_model, epoch)  # gradients of the epoch's last step are still in .grad
        if world > 1:
            dist.all_reduce(sums.sums)
        images_seen = sums.images * world  # every rank takes the same number of images
        cm, val_loss = evaluate(model, criterion, val_split, cfg, device, len(class_names), rank, world)
        if cfg.optim.schedule == "plateau":
            scheduler.step(val_loss)
        report = classification_report(cm, class_names)
        metrics = {
            "epoch": epoch,
            "train_loss": float(sums.sums[0]) / images_seen,
            "train_acc": float(sums.sums[1]) / images_seen,
            "val_loss": val_loss,
            "val_acc": report["accuracy"],
            "val_macro_precision": report["macro_precision"],
            "val_macro_recall": report["macro_recall"],
            SCORE: report["macro_f1"],
            "val_weighted_f1": report["weighted_f1"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_img_per_s": images_seen / train_time,
            "epoch_time_s": time.perf_counter() - started,
            "resumed": bool(checkpoint),
        }
        history.append(metrics)
        best_score = max(best_score, metrics[SCORE])
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.optim.epochs} train loss {metrics['train_loss']:.3f} acc {metrics['train_acc']:.3f} | "
                  f"val loss {val_loss:.3f} acc {metrics['val_acc']:.3f} macro-F1 {metrics[SCORE]:.3f} | "
                  f"{metrics['train_img_per_s']:.0f} img/s", flush=True)
            writer.scalars(metrics, epoch)
        ckpt = None
        if rank == 0:
            folder = Path(tempfile.mkdtemp(prefix=f"simpsons-ckpt-{epoch}-"))  # Ray deletes it once uploaded
            torch.save(checkpoint_state(model, optimizer, scheduler, step.scaler, epoch=epoch, best_score=best_score,
                                        history=history, config=to_dict(cfg), class_names=list(class_names)),
                       folder / CHECKPOINT_FILE)
            (folder / METRICS_FILE).write_text(json.dumps(
                {"epoch": epoch, "val": report, "confusion": cm.cpu().tolist(), "history": history}))
            ckpt = ray.train.Checkpoint.from_directory(str(folder))
        # The checkpoint is copied to storage in the background while the next epoch trains (a GPU
        # epoch on 8 workers is shorter than the round trip); Ray deletes the local folder when the
        # copy has finished, and the worker's end waits for every pending copy.
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
    if writer:
        writer.close()


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


# Restarts of the Train controller after a failure of its own (a worker group that did not start
# in RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, e.g. while the autoscaler boots a cold node) before
# the run fails. Ray's default, -1, retries for ever: a run that can never start would never end.
CONTROLLER_FAILURE_LIMIT = 3
# Where the cluster launcher (`ray up`) puts its config on the head node.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass
class ClusterCapacity:
    """The Ray cluster's nodes and what its autoscaler may add (nothing on a plain `ray.init()`)."""

    # Total resources of every live node, e.g. {"CPU": 48.0, "GPU": 4.0}; busy ones included,
    # since they are freed again: only what can never exist makes a run impossible.
    nodes: list[dict[str, float]]
    # Live nodes other than the driver's (Ray Train workers may land on any of them).
    other_nodes: int
    # Autoscaler node types: (name, resources of one node, nodes of the type it may start).
    node_types: list[tuple[str, dict[str, float], int]] = field(default_factory=list)
    # The autoscaler's limit on worker nodes of all types together (None: no limit given).
    max_added: int | None = None

    def can_add_nodes(self) -> bool:
        return any(count > 0 for _, _, count in self.node_types) and self.max_added != 0

    def has(self, resource: str) -> bool:
        """Whether some node has, or some node type the autoscaler may start would have, `resource`."""
        return any(node.get(resource, 0) > 0 for node in self.nodes) or any(
            res.get(resource, 0) > 0 for _, res, count in self.node_types if count > 0 and self.max_added != 0)

    def bundles_that_fit(self, bundle: dict[str, float]) -> int:
        """How many copies of `bundle` (one worker's resources) the cluster holds at most, counting
        the nodes its autoscaler may add, so a PACK or SPREAD placement of that many can succeed."""
        def per_node(resources: dict[str, float]) -> int:
            needed = [(k, v) for k, v in bundle.items() if v > 0]
            if not needed:
                return 1 << 30
            return min(int(resources.get(k, 0) / v + 1e-9) for k, v in needed)

        total = sum(per_node(node) for node in self.nodes)
        room = float("inf") if self.max_added is None else self.max_added
        for _, resources, count in sorted(self.node_types, key=lambda t: per_node(t[1]), reverse=True):
            added = int(min(count, room))
            total += per_node(resources) * added
            room -= added
        return total

    def describe(self) -> str:
        def fmt(resources: dict[str, float]) -> str:
            shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))}
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"

        text = f"{len(self.nodes)} node(s) {', '.join(fmt(n) for n in self.nodes) or ''}".rstrip()
        types = [f"up to {count} x {name} {fmt(res)}" for name, res, count in self.node_types if count > 0]
        if types and self.max_added != 0:
            limit = "" if self.max_added is None else f", at most {self.max_added} in all"
            return f"{text}; its autoscaler can add {', '.join(types)}{limit}"
        return f"{text} and no autoscaler that can add more"


def cluster_capacity() -> ClusterCapacity:
    """The connected Ray cluster's nodes, plus the node types its autoscaler reported to the GCS."""
    driver_node = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    capacity = ClusterCapacity(
        nodes=[{k: float(v) for k, v in node.get("Resources", {}).items()} for node in alive],
        other_nodes=sum(node.get("NodeID") != driver_node for node in alive),
    )
    capacity.node_types, capacity.max_added = _autoscaler_node_types()
    return capacity


def _autoscaler_node_types() -> tuple[list[tuple[str, dict[str, float], int]], int | None]:
    """(node types, limit on added nodes) of the cluster's autoscaler; ([], None) without one."""
    from ray._private.state import state

    config = state.get_cluster_config()  # reported to the GCS by autoscalers that do (KubeRay's v2)
    if config is not None and config.node_group_configs:
        unlimited = 1 << 30
        return [(group.name, {k: float(v) for k, v in group.resources.items()},
                 unlimited if group.max_count < 0 else int(group.max_count))
                for group in config.node_group_configs], None
    # The VM launcher (`ray up`) reports nothing; it leaves its config where Tune also looks for it
    # (ray.tune.execution.cluster_info): on the head, where `ray job submit` runs the driver.
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        import yaml

        return launcher_node_types(yaml.safe_load(path.read_text()) or {})
    return [], None


def launcher_node_types(config: dict) -> tuple[list[tuple[str, dict[str, float], int]], int | None]:
    """(worker node types, global max_workers) of a cluster launcher config such as cluster.yaml."""
    head = config.get("head_node_type")
    types = [(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, int(spec.get("max_workers", 0)))
             for name, spec in (config.get("available_node_types") or {}).items() if name != head]
    limit = config.get("max_workers")
    return types, None if limit is None else int(limit)


def resolve_resources(cfg: Config, capacity: ClusterCapacity | None = None) -> Config:
    """Fill in train.use_gpu="auto" and cpus_per_worker=0 from the Ray cluster, and refuse a
    placement the cluster can never satisfy (Ray Train would otherwise wait and retry for ever)."""
    cfg = from_dict(to_dict(cfg))
    capacity = capacity or cluster_capacity()
    if cfg.train.use_gpu == "auto":
        # On an autoscaling cluster the GPU nodes may not exist yet when the job starts: the node
        # types decide, or "auto" would quietly train on the GPU nodes' CPUs.
        cfg.train.use_gpu = capacity.has("GPU")
    if not cfg.train.cpus_per_worker:
        cpus = sum(node.get("CPU", 0) for node in capacity.nodes)
        cfg.train.cpus_per_worker = float(max(1, int(cpus // cfg.train.workers)))
    bundle = worker_resources(cfg)
    fits = capacity.bundles_that_fit(bundle)
    if fits < cfg.train.workers:
        asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
        raise ConfigError(
            f"The run asks for {cfg.train.workers} Ray Train worker(s) with {asked} each, but the cluster "
            f"({capacity.describe()}) can hold {fits}; lower train.workers or train.cpus_per_worker"
            f"{', set train.use_gpu=false' if cfg.train.use_gpu else ''}, or add nodes (cluster.yaml max_workers)."
        )
    return cfg


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker holds (resources must be resolved: see resolve_resources)."""
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return {**resources, **cfg.train.resources_per_worker}


def check_storage_reach(cfg: Config, dataset_uri: str, capacity: ClusterCapacity) -> None:
    """Refuse local folders for the data and the run when workers may run on another machine.

    A folder on the driver's disk does not exist on the other nodes: their workers would fail
    with a misleading "dataset missing" (retried train.max_failures times) or, for run.storage,
    only at the first checkpoint, an epoch later.
    """
    if not (capacity.other_nodes or capacity.can_add_nodes()):
        return
    where = f"this Ray cluster has (or can add) nodes other than the driver's ({capacity.describe()}), whose workers cannot see it"
    if not storage.is_s3(dataset_uri):
        raise ConfigError(
            f"The dataset {dataset_uri or cfg.data.source} is a local folder, but {where}; prepare it into S3 "
            f"(python jobs/prepare_data.py --dest s3://BUCKET/PREFIX) and set data.uri to the s3:// version it prints."
        )
    if not storage.is_s3(cfg.run.storage):
        raise ConfigError(
            f"run.storage {cfg.run.storage} is a local folder, but {where}; set run.storage=s3://BUCKET/PREFIX."
        )


def absolute_dataset_uri(uri: str) -> str:
    """An s3:// URI as it is; a local folder as an absolute path (workers do not share our cwd)."""
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), or start a local one.

    A RAY_ADDRESS whose GCS does not answer is refused at once: `ray.init` would wait on it for
    minutes. When ASHA stops a trial, Ray Train's placement-group cleaner frees the trial's workers;
    it finds the cluster through the dashboard and, if it has to guess while other Ray instances
    run on the same machine, gives up, so the stopped trial's CPUs are never freed and the next
    trial waits for ever. A local cluster therefore gets a known dashboard port whose address every
    Ray process inherits (the raylet copies this process's environment).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
        ray.init()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_port=port)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One sentence instead of ray.init's minutes-long wait when RAY_ADDRESS names a dead GCS."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: Ray's own lookup
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"No Ray cluster answers at RAY_ADDRESS={address} ({exc.strerror or exc}); start it "
            f"(ray start --head) or unset RAY_ADDRESS to run on a local Ray instance."
        ) from None


def prepare_run(cfg: Config, dataset_uri: str | None = None) -> Config:
    """The driver's checks before anything travels to a worker: paths made absolute, local folders
    refused on a multi-node cluster, resources resolved and the placement shown to be possible.

    `dataset_uri` defaults to data.uri (empty: prepared from data.source into the local cache).
    Joins the Ray cluster (or starts a local one) if this process has not yet.
    """
    init_ray()
    cfg = resolve_paths(cfg)
    capacity = cluster_capacity()
    check_storage_reach(cfg, cfg.data.uri if dataset_uri is None else dataset_uri, capacity)
    return resolve_resources(cfg, capacity)


def build_trainer(cfg: Config, dataset_uri: str, name: str | None = None, callbacks=None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for this config (resources must be resolved: see resolve_resources)."""
    name = name or cfg.run.name
    resources = worker_resources(cfg)
    fs, path = storage.pyarrow_filesystem(cfg.run.storage, cfg.run.s3_endpoint)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "dataset": dataset_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            callbacks=callbacks,
        ),
    )


def best_checkpoint(result) -> ray.train.Checkpoint:
    if not result.best_checkpoints:
        raise RuntimeError("The run reported no checkpoint; nothing to export.")
    checkpoint, _ = max(result.best_checkpoints, key=lambda pair: pair[1][SCORE])
    return checkpoint


def fit(cfg: Config, dataset_uri: str) -> dict:
    """Train with Ray Train, then export the best checkpoint; returns the exported metrics."""
    from simpsons.export import export_best, read_history

    storage.check_writable(cfg.run.storage, cfg.run.s3_endpoint)  # said now, not by Ray's controller later
    dataset_uri = absolute_dataset_uri(dataset_uri)
    if not storage.is_s3(dataset_uri):
        read_manifest(dataset_uri)  # a missing dataset is the user's to fix, not a worker failure to retry
    else:
        check_dataset(dataset_uri, cfg.run.s3_endpoint)  # the same for an incomplete S3 version
    cfg = prepare_run(cfg, dataset_uri)
    print(f"Training {cfg.run.name}: {cfg.train.workers} worker(s), {'GPU' if cfg.train.use_gpu else 'CPU'}, "
          f"{cfg.train.cpus_per_worker:g} CPU(s) each, {cfg.optim.epochs} epochs -> {cfg.run.storage}", flush=True)
    result = build_trainer(cfg, dataset_uri).fit()
    dest = storage.join(cfg.run.storage, cfg.run.name, "best")
    # Read the latest checkpoint before opening the best one: when they are the same checkpoint, a
    # nested as_directory() in one process shares its temp folder and deletes it on the inner exit.
    history = read_history(result.checkpoint)
    with best_checkpoint(result).as_directory() as ckpt_dir:
        return export_best(ckpt_dir, dest, cfg, history=history)
