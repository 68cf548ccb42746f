"""The Ray Train worker: the loop every worker process runs, with rank 0's TensorBoard and MLflow.

    setup      the packed dataset into the node's cache, resident on the device; the recipe's
               model, loss, optimizer and schedule, the model wrapped for DDP by Ray
    restore    the latest checkpoint Ray hands back (a restart, a resumed run), mid-epoch included
    epochs     simpsons.engine trains and evaluates; each epoch is reported to Ray with a checkpoint

The Ray calls are the `ray.train.*` ones: get_context, get_device, prepare_model, get_checkpoint,
report, get_preemption_info and collective.broadcast_from_rank_zero.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import ray.train
import ray.train.collective
import ray.train.torch
import torch

from simpsons import checkpoint, files, storage, tracking
from simpsons.config import Config, from_dict, training_dict
from simpsons.data import ResidentSplit, data_placement
from simpsons.dataset import load_packed, local_dataset_dir, read_manifest
from simpsons.engine import EpochProgress, EpochStats, TrainStep, evaluate, train_one_epoch
from simpsons.logs import configure_logging
from simpsons.metrics import classification_report
from simpsons.names import EVALUATED, LAST_SCORE, MID_EPOCH, SCORE
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_step, ddp_options

_logger = logging.getLogger(__name__)
# A worker's local files (checkpoints before their upload, TensorBoard events) live in its scratch
# folder, so that what a killed worker leaves is removed by the next one on its node.
SCRATCH = "simpsons-worker"


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
    plan = Plan.of(cfg, device, world)
    steps_per_epoch = train_split.steps_per_epoch(plan.batch, world, plan.drop_last)

    ddp_kwargs = ddp_options(cfg)
    model, criterion, optimizer = build_components(
        cfg,
        manifest["splits"]["train"]["class_counts"],
        device,
        prepare=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs),
    )
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    step = create_train_step(cfg, model, criterion, optimizer, scheduler)

    start_epoch, best_score, history, partial = 0, -1.0, [], None
    last_score = float("-inf")  # SCORE of the last evaluated epoch
    resumed_from = ray.train.get_checkpoint()
    if resumed_from:
        with resumed_from.as_directory() as folder:
            state = checkpoint.load(folder, device)
        checkpoint.restore(state, model, optimizer, scheduler, step.scaler, step.ema)
        best_score, history = state["best_score"], state["history"]
        last_score = next((h[SCORE] for h in reversed(history) if h.get(EVALUATED, True)), last_score)
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
                                          best_score=best_score, history=history, config=training_dict(cfg),
                                          class_names=list(class_names), provenance=origin,
                                          tracking_run=tracker.run_id if tracker else "", **extra)  # fmt: skip
        folder = tempfile.mkdtemp(prefix=f"checkpoint-{epoch}-", dir=files.scratch_folder(SCRATCH))
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
            epoch, plan.batch, plan.seed, rank, world, start=resume.images if resume else 0, drop_last=plan.drop_last
        )
        mid_epoch.epoch = epoch
        trained = train_one_epoch(
            step,
            batches,
            plan.train_preset(epoch),
            plan.seed,
            epoch,
            rank,
            world,
            resume,
            mid_epoch,
            mid_epoch.hook_every,
            log_every=plan.log_every if rank == 0 else 0,
            log_label=f"epoch {epoch + 1}/{cfg.optim.epochs} of {steps_per_epoch} steps:",
        )
        if writer and cfg.train.histogram_every and (epoch + 1) % cfg.train.histogram_every == 0:
            writer.histograms(getattr(model, "module", model), epoch)  # the epoch's last gradients are still in .grad
        trained_s = time.perf_counter() - started
        if plan.evaluates(epoch):
            cm, report, validated = validate(step, val_split, plan, cfg.optim.schedule, class_names, rank, world)
            last_score, figures = validated[SCORE], {"val": report, "confusion": cm.cpu().tolist()}
        else:  # no val_* figures; never ranked the best checkpoint (as a mid-epoch one); Tune sees last_score
            validated, figures = {SCORE: float("-inf")}, {}
        metrics = {"epoch": epoch, "train_loss": trained.loss, "train_acc": trained.accuracy, **validated,
                   EVALUATED: plan.evaluates(epoch), LAST_SCORE: last_score,
                   "lr": optimizer.param_groups[0]["lr"], "train_img_per_s": trained.images_per_s,
                   "train_time_s": trained_s, "evaluate_time_s": time.perf_counter() - started - trained_s,
                   "epoch_time_s": time.perf_counter() - started, "resumed": bool(resumed_from),
                   "trained_steps": trained.steps}  # fmt: skip
        history.append(metrics)
        best_score = max(best_score, metrics[SCORE])
        if rank == 0:
            _logger.info(epoch_line(metrics, trained, cfg.optim.epochs))
            writer.scalars(metrics, epoch)
        if rank == 0 and tracker:
            tracker.log_epoch(metrics)
        saved = save(epoch, figures)
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


def validate(
    step: TrainStep, split: ResidentSplit, plan: Plan, schedule: str, class_names: list[str], rank: int, world: int
):
    """(confusion matrix, report, val_* figures) of the weights that are served: the moving average
    when optim.ema_decay keeps one (the raw weights' scores then come as raw_val_*), else the trained
    weights. A plateau schedule steps on the trained weights' loss."""

    def scores(model):
        return evaluate(model, step.criterion, split, plan.eval, plan.dtype, plan.eval_batch, len(class_names),
                        plan.tta_flip, rank, world, plan.pad_eval)  # fmt: skip

    raw_cm, raw_loss = scores(step.model)
    if schedule == "plateau":
        step.scheduler.step(raw_loss)
    cm, loss = scores(step.ema) if step.ema is not None else (raw_cm, raw_loss)
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
    val = (
        f"val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f} macro-F1 {m[SCORE]:.3f}"
        if m[EVALUATED]
        else f"not evaluated (train.evaluate_every; last macro-F1 {m[LAST_SCORE]:.3f})"
    )
    return (f"epoch {m['epoch'] + 1}/{epochs} train loss {m['train_loss']:.3f} acc {m['train_acc']:.3f} | "
            f"{val} | {trained.images_per_s:.0f} img/s")  # fmt: skip


def resident_splits(
    dataset_dir: str | Path, device: torch.device, share: float, announce: bool = True
) -> tuple[ResidentSplit, ResidentSplit]:
    """The packed train and val splits, kept whole on `device` (or in host memory when they
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

        self.local = tempfile.mkdtemp(prefix="tensorboard-", dir=files.scratch_folder(SCRATCH))
        self.remote = storage.join(cfg.run.storage, cfg.run.name, "tensorboard")
        self.endpoint = cfg.run.s3_endpoint
        self.writer = SummaryWriter(self.local)
        self.every = cfg.train.tensorboard_every

    def scalars(self, metrics: dict, epoch: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, float) and math.isfinite(value):  # an unevaluated epoch's score is -inf
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
