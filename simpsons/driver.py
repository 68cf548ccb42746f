"""The driver: every check before Ray, the dataset, and the Ray Train run of a job.

fit(cfg)              a whole training job: prepare_run -> ready_dataset -> run_trainer -> best/
prepare_run(cfg)      the checks that refuse a bad run in seconds, then Ray joined, paths and
                      resources settled (also the first step of a sweep: simpsons.tune)
ready_dataset(cfg)    the packed dataset the run trains on, prepared from data.source if need be
run_trainer(cfg, ..)  Ray Train's TorchTrainer running simpsons.worker.train_loop_per_worker
"""

from __future__ import annotations

import json
import logging

import ray.train
import ray.train.torch
import torch

from simpsons import checkpoint, storage, tracking
from simpsons.cluster import (
    CONTROLLER_FAILURE_LIMIT,
    LaunchWatch,
    absolute_dataset_uri,
    bound_capacity_wait,
    capacity_error,
    check_output_paths,
    check_storage_reach,
    cluster_capacity,
    init_ray,
    resolve_resources,
    worker_resources,
)
from simpsons.config import Config, ConfigError, config_text, resolve_paths, to_dict, with_overrides
from simpsons.dataset import check_dataset, manifest_bytes, read_manifest
from simpsons.names import SCORE
from simpsons.prepare import cached_pack
from simpsons.recipe import build_components, create_scheduler, create_train_step
from simpsons.report import write_best
from simpsons.sources import check_source, fetch_source
from simpsons.worker import train_loop_per_worker

_logger = logging.getLogger(__name__)


def prepare_run(cfg: Config, dataset_uri: str | None = None, runs_at_once: int = 1, driver_cpus: float = 0.0) -> Config:
    """The driver's checks, each once, before data is prepared and anything travels to a worker.

    First what is refused in seconds without Ray: output paths, the run's storage (reachable,
    bucket exists, writable: said now, not by Ray's controller an epoch later), the tracking server,
    a raw data source that cannot exist and any value the workers' model, loss, optimizer or schedule
    would refuse. Then, joined to the Ray cluster (or a local one started): paths made absolute,
    local folders refused on a multi-node cluster, resources resolved (train.cpus_per_worker=0
    shares the CPUs between the workers of `runs_at_once` runs, each of whose drivers holds
    `driver_cpus`) and the placement shown possible.
    `dataset_uri` defaults to data.uri (empty: prepared from data.source into the local cache).
    """
    check_output_paths(cfg)
    cfg = tracking.resolve(cfg)  # MLFLOW_TRACKING_URI and the experiment's default, settled on the driver
    check_inputs(cfg, dataset_uri)
    init_ray()
    cfg = resolve_paths(cfg)
    capacity = cluster_capacity()
    check_storage_reach(cfg, cfg.data.uri if dataset_uri is None else dataset_uri, capacity)
    return resolve_resources(cfg, capacity, runs_at_once, driver_cpus)


def check_inputs(cfg: Config, dataset_uri: str | None = None) -> None:
    """What a job can refuse in seconds, before Ray starts and data is prepared: the run's storage
    (reachable, bucket exists, writable), the MLflow tracking server (with run.tracking_uri set), a
    packed dataset (`dataset_uri` or data.uri) without a manifest or packed at another side
    (check_stored_size), else a raw data source that cannot exist, and the recipe's objects
    (check_recipe)."""
    check_recipe(cfg)
    storage.check_writable(cfg.run.storage, cfg.run.s3_endpoint)
    tracking.check(cfg)
    if dataset_uri or cfg.data.uri:
        check_stored_size(cfg, absolute_dataset_uri(dataset_uri or cfg.data.uri))
    else:
        check_source(cfg.data.source)  # packed later, at data.stored_size


def check_recipe(cfg: Config) -> None:
    """Build the run's model, loss, optimizer, schedule and step on the CPU, without data or
    starting weights, so a value that passes the config's bounds but that they refuse is said here
    in one sentence, not by every Ray worker after the cluster has started."""
    blank = with_overrides(cfg, {"model.weights": "none"})  # weights are checked where they are read
    classes, alpha = cfg.data.classes, cfg.loss.alpha  # "auto" classes: known once the data is read
    counts = [1] * (len(classes) if isinstance(classes, list) else len(alpha) if isinstance(alpha, list) else 2)
    try:
        model, criterion, optimizer = build_components(blank, counts, torch.device("cpu"))
    except ValueError as exc:
        raise ConfigError(
            f"The config's model, loss or optimizer cannot be built ({str(exc).rstrip('.')}); change that value."
        ) from None
    try:
        scheduler = create_scheduler(optimizer, blank, steps_per_epoch=1)
    except ValueError as exc:  # torch's own words, e.g. ReduceLROnPlateau's "Factor should be < 1.0."
        raise ConfigError(
            f"The learning-rate schedule optim.schedule={cfg.optim.schedule} refuses these optim.* values "
            f"({str(exc).rstrip('.')}); change optim.plateau_factor or optim.plateau_patience."
        ) from None
    create_train_step(blank, model, criterion, optimizer, scheduler)


def ready_dataset(cfg: Config, dataset_uri: str | None = None) -> str:
    """The packed dataset the run trains on, as workers on any node find it: `dataset_uri`, else
    data.uri, else data.source fetched and packed into the local cache; refused when its manifest
    is missing (a user's mistake, not a worker failure for Ray to retry)."""
    if not (dataset_uri or cfg.data.uri):
        d = cfg.data
        tree = fetch_source(d.source, d.cache_dir, max_image_bytes=d.max_image_bytes)
        dataset_uri = str(cached_pack(tree, d.cache_dir, d.stored_size, d.pack_workers, d.classes, d.max_image_bytes))
    uri = absolute_dataset_uri(dataset_uri or cfg.data.uri)
    if storage.is_s3(uri):
        check_dataset(uri, cfg.run.s3_endpoint)  # an incomplete S3 version has no manifest
    else:
        read_manifest(uri)
    return uri


def check_stored_size(cfg: Config, dataset_uri: str) -> None:
    """A packed dataset (its manifest read, so a missing one is refused here too) whose side is not
    data.stored_size is refused: training would crop from images of the dataset's side while
    evaluate, predict, serving and model.pt2 decode images at data.stored_size."""
    stored_size = json.loads(manifest_bytes(dataset_uri, cfg.run.s3_endpoint))["stored_size"]
    wanted = cfg.data.stored_size
    if stored_size != wanted:
        raise ConfigError(
            f"The dataset {dataset_uri} was packed at {stored_size} px but data.stored_size is {wanted}; "
            f"set data.stored_size={stored_size} (and data.train_size at most that), or pack the data "
            f"again at {wanted} px (jobs/prepare_data.py --set data.stored_size={wanted} --version <new>)."
        )


def build_trainer(
    cfg: Config, dataset_uri: str, name: str | None = None, callbacks=None, tracking_spec: dict | None = None
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for this config (resources must be resolved: see prepare_run);
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
    cfg = prepare_run(cfg, dataset_uri)
    dataset_uri = ready_dataset(cfg, dataset_uri)
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
