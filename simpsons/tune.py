"""Ray Tune sweeps: every trial is a whole distributed Ray Train run with sampled hyperparameters.

    sweep settings   the `tune:` section of the config (`simpsons.config.SweepConfig`, loaded
                     with the training sections by `simpsons.config.load_sweep`) + `--set tune.x=...`
    a trial          `run_trial`: the base config with the sampled values applied, fitted by the
                     same TorchTrainer as a single run (`simpsons.driver.run_trainer`); a
                     TuneReportCallback hands every epoch's metrics to Tune, so ASHA can stop it
    the end          `simpsons.sweep_report`: trials.csv, trials.png and the best trial's best
                     checkpoint reported exactly like a single run (`simpsons.report.write_best`)

Everything lands under `<run.storage>/<tune.name>/` (a local folder or s3://bucket/prefix):

    tuner.pkl, experiment_state-*.json   Tune's own state; `Tuner.restore` resumes from it
    trial-<id>/                          Tune's per-trial results (result.json, progress.csv)
    runs/<sweep>-<id>/                   each trial's Ray Train run: checkpoints, TensorBoard
    sweep.yaml                           the resolved base config and sweep settings
    trials.csv, trials.png               one row / one point per trial
    best/                                the winner: checkpoint.pt, metrics.json, per_class.csv, ...
"""

from __future__ import annotations

import logging
import posixpath

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from simpsons import storage, tracking
from simpsons.config import Config, ConfigError, SweepConfig, from_dict, space_entry, to_dict, with_overrides
from simpsons.driver import prepare_run, ready_dataset, run_trainer
from simpsons.names import EVALUATED, LAST_SCORE, MID_EPOCH, SCORE
from simpsons.sweep_report import format_value, searched_keys, summarize_trials, write_sweep_config, write_sweep_report

_logger = logging.getLogger(__name__)

# The custom resource that marks nodes safe for trial drivers (cluster.yaml's head advertises it).
TRIAL_DRIVER = "trial_driver"
EPOCHS = "epochs"  # epochs completed (1-based), added to every result Tune sees: ASHA's clock


def search_space(sweep: SweepConfig) -> dict:
    """The Tune param_space: {config key: Tune domain}."""
    space = {}
    for key, spec in sweep.space.items():
        kind, args = space_entry(key, spec)
        if kind == "uniform":
            space[key] = tune.uniform(*args)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*args)
        elif kind == "randint":
            space[key] = tune.randint(args[0], args[1] + 1)  # Tune's upper bound is exclusive
        elif kind == "choice":
            space[key] = tune.choice(args)
        else:
            space[key] = tune.grid_search(args)
    return space


# ---------------------------------------------------------------------------------------------
# A trial (runs inside a Tune actor; the Train workers it starts hold the real resources)


class EpochReportCallback(TuneReportCallback):
    """TuneReportCallback that also reports `epochs` (epochs completed), the scheduler's clock.

    Tune's own `training_iteration` restarts at 1 when an interrupted trial resumes from its
    Train checkpoint in the middle of training; the epoch count does not. Mid-epoch reports (a
    preemption's checkpoint, train.checkpoint_every_steps) have no validation: Tune never sees them.
    """

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get(MID_EPOCH):
            return
        # An epoch without evaluation (train.evaluate_every) reports the last evaluated score to
        # the scheduler, not its -inf checkpoint rank.
        metrics = [
            dict(m, **{EPOCHS: m["epoch"] + 1}, **({} if m.get(EVALUATED, True) else {SCORE: m[LAST_SCORE]}))
            for m in metrics
        ]
        super().after_report(run_context, metrics, checkpoint)


def trial_config(base: Config, params: dict, trial_id: str, sweep_uri: str) -> Config:
    """The config one trial trains with: base + sampled values, its own run folder under runs/."""
    name = f"{posixpath.basename(sweep_uri.rstrip('/'))}-{trial_id}"
    return with_overrides(base, {**params, "run.storage": storage.join(sweep_uri, "runs"), "run.name": name})


def trial_run_uri(cfg: Config) -> str:
    """Where a trial's Train run lives (its MLflow child run is tagged with it)."""
    return storage.join(cfg.run.storage, cfg.run.name)


def run_trial(params: dict, base: dict, dataset: str, sweep_uri: str, tracking_parent: dict | None = None) -> None:
    """Tune function trainable: one whole Ray Train run with the sampled `params`.

    The Train run is named after the trial id, so a trial restarted by `Tuner.restore` continues
    from its own last checkpoint instead of starting over; so does its MLflow child run under
    `tracking_parent` (the sweep's run, `tracking.TrackedRun.trial_spec`; None without tracking).
    """
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base), params, trial_id, sweep_uri)
    child = tracking.open_trial(cfg, tracking_parent, trial_run_uri(cfg))
    run_trainer(cfg, dataset, name=cfg.run.name, callbacks=[EpochReportCallback()], tracking_spec=child.spec)


class ProgressCallback(tune.Callback):
    """One line per trial start and end in the driver's log (Tune's table only comes every 30 s)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.config.items())
        _logger.info("trial %s started: %s", trial.trial_id, params)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get(EPOCHS, 0)
        how = "stopped early by the scheduler" if done < self.epochs else "completed"
        _logger.info(
            "trial %s %s after %d/%d epochs: val macro-F1 %.4f",
            trial.trial_id,
            how,
            done,
            self.epochs,
            result.get(SCORE, float("nan")),
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        _logger.info("trial %s failed; its error is in %s/error.txt", trial.trial_id, trial.path)


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# The sweep driver


def trial_driver_resources(sweep: SweepConfig) -> dict[str, float]:
    """What each trial's driver (the Tune function running the TorchTrainer) holds.

    On a cluster whose safe nodes (cluster.yaml: the head) advertise TRIAL_DRIVER, one unit of
    it and no CPU, so trial drivers never land on the GPU nodes beside training
    workers; elsewhere (a laptop's `ray.init()`) tune.trial_cpus CPUs.
    """
    if ray.cluster_resources().get(TRIAL_DRIVER, 0) >= 1:
        return {"CPU": 0, TRIAL_DRIVER: 1}
    return {"CPU": sweep.trial_cpus}


def resolve_sweep_resources(cfg: Config, dataset_uri: str | None = None) -> tuple[Config, int]:
    """(cfg with paths and resources settled and checked, trials that run at once).

    Runs the driver's checks and joins the Ray cluster (`simpsons.driver.prepare_run`); an unset
    train.cpus_per_worker shares the CPUs between the workers of tune.max_concurrent_trials trials
    (one when 0), and 0 concurrent trials means as many as fit.
    """
    sweep = cfg.tune
    cfg = prepare_run(cfg, dataset_uri, max(1, sweep.max_concurrent_trials), driver_cpus=sweep.trial_cpus)
    if sweep.max_concurrent_trials:
        return cfg, sweep.max_concurrent_trials
    available = ray.cluster_resources()
    driver = trial_driver_resources(sweep)
    per_trial = driver["CPU"] + cfg.train.workers * cfg.train.cpus_per_worker
    fits = int(available.get("CPU", 0) / per_trial + 1e-9)
    if cfg.train.use_gpu:
        fits = min(fits, int(available.get("GPU", 0) // cfg.train.workers))
    if TRIAL_DRIVER in driver:
        fits = min(fits, int(available.get(TRIAL_DRIVER, 0)))
    if fits < 1:
        gpus = f" and {cfg.train.workers} GPUs" if cfg.train.use_gpu else ""
        raise ConfigError(
            f"One trial needs {per_trial:g} CPUs ({driver['CPU']:g} for its driver + {cfg.train.workers} workers x "
            f"{cfg.train.cpus_per_worker:g}){gpus} but the cluster has {available.get('CPU', 0):g} CPUs and "
            f"{available.get('GPU', 0):g} GPUs; lower train.workers or train.cpus_per_worker, or set "
            f"tune.max_concurrent_trials if the cluster autoscales."
        )
    return cfg, fits


def create_searcher(sweep: SweepConfig, max_concurrent: int = 0):
    """Tune's search algorithm (random/grid, or Optuna / HyperOpt when installed), at most
    `max_concurrent` trials at a time (0 = no limit)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search == "random":
        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: limit it here.
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)
    if any(next(iter(spec)) == "grid" for spec in sweep.space.values()):
        raise ConfigError(f"tune.search={sweep.search} cannot take grid entries in tune.space; use choice instead.")
    try:  # Tune's wrappers import fine without the package and assert in __init__
        if sweep.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=sweep.seed)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            searcher = HyperOptSearch(random_state_seed=sweep.seed)
    except (ImportError, AssertionError):
        raise ConfigError(
            f"tune.search={sweep.search} needs the {sweep.search} package: pip install {sweep.search}, "
            f"or use tune.search=random."
        ) from None
    return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch, since the trial ends by itself right after.

    Ending by itself is what lets Ray Train shut the trial's run down in order: its worker group
    torn down and its request for worker nodes withdrawn from the autoscaler. A trial that Tune
    stops has its actor killed with Train's controller inside, and that request stays with the
    autoscaler until it expires (Ray 2.60: 180 s, then up to a 20-s tick), keeping a GPU node up
    after the sweep. Plain ASHA stops every trial at max_t, and a rung can fall on the last epoch.
    """

    def __init__(self, **kwargs):
        super().__init__(stop_last_trials=False, **kwargs)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return decision


def create_trial_scheduler(cfg: Config) -> FinishingASHA | None:
    """ASHA on the epoch count (tune.scheduler=asha), or None for Tune's FIFO. (Not the LR schedule:
    that is `simpsons.recipe.create_scheduler`.) `check_sweep` has checked grace_period <= epochs."""
    if cfg.tune.scheduler == "fifo":
        return None
    return FinishingASHA(
        time_attr=EPOCHS,
        max_t=cfg.optim.epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def run_sweep(cfg: Config, dataset_uri: str | None = None, resume: bool = False) -> list[dict]:
    """Run (or with resume=True, continue) the sweep of `cfg.tune`, then report it; returns the
    trials.csv rows. `cfg` comes from `simpsons.config.load_sweep`, which checked the sweep.

    Each check happens once, cheapest first: the storage (and a raw data source) before Ray starts,
    the placement before any data is prepared; `dataset_uri` defaults to data.uri, or data.source
    prepared into the local cache.
    """
    sweep = cfg.tune
    # prepare_run's checks, Ray, the placement; the MLflow experiment defaults to the sweep's name
    cfg, concurrent = resolve_sweep_resources(tracking.for_sweep(cfg), dataset_uri)
    dataset_uri = ready_dataset(cfg, dataset_uri)  # an absolute path: trials run in folders of their own
    sweep_uri = storage.join(cfg.run.storage, sweep.name)
    fs, root = storage.pyarrow_filesystem(cfg.run.storage, cfg.run.s3_endpoint)
    experiment_path = posixpath.join(root, sweep.name)
    exists = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if resume and not exists:
        raise ConfigError(
            f"There is no sweep to resume at {sweep_uri}; run the same command without --resume to start it."
        )
    if exists and not resume:
        raise ConfigError(
            f"A sweep named {sweep.name!r} already exists at {sweep_uri}; add --resume to "
            f"continue it or set tune.name to start another."
        )
    parent = tracking.open_sweep(cfg, sweep_uri, fresh=not resume)  # MLflow: the sweep's run (none when off)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=to_dict(cfg), dataset=dataset_uri, sweep_uri=sweep_uri, tracking_parent=parent.trial_spec
        ),
        trial_driver_resources(sweep),
    )
    if resume:
        _logger.info(
            "Resuming sweep %s at %s: finished trials are kept, unfinished ones continue.", sweep.name, sweep_uri
        )
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        write_sweep_config(cfg, sweep_uri)
        _logger.info(
            "Sweep %s: %d trial(s), %d at a time, each %d %s worker(s) x %d epochs, scheduler %s, search %s -> %s",
            sweep.name,
            sweep.num_samples,
            concurrent,
            cfg.train.workers,
            "GPU" if cfg.train.use_gpu else "CPU",
            cfg.optim.epochs,
            sweep.scheduler,
            sweep.search,
            sweep_uri,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=SCORE,
                mode="max",
                num_samples=sweep.num_samples,
                search_alg=create_searcher(sweep, concurrent),
                scheduler=create_trial_scheduler(cfg),
                trial_name_creator=_trial_dirname,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=root,
                storage_filesystem=fs,
                verbose=1,
                callbacks=[ProgressCallback(cfg.optim.epochs)],
                # A trial whose driver was lost (its node died) starts again; its Train run, named
                # after the trial, resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            ),
        )
    tuner.fit()
    rows = summarize_trials(cfg, sweep_uri)
    best = rows[0]
    best_cfg = trial_config(cfg, {k: best[k] for k in searched_keys(rows)}, best["trial_id"], sweep_uri)
    write_sweep_report(rows, sweep_uri, best_cfg, publish=parent.log_artifacts)
    # MLflow: each trial's child run gets the scheduler's decision and ends; then the parent.
    tracking.finish_trials(cfg, rows, lambda trial_id: trial_run_uri(trial_config(cfg, {}, trial_id, sweep_uri)))
    parent.set_tags({"simpsons.best_trial": best["trial_id"], "simpsons.best_uri": storage.join(sweep_uri, "best")})
    parent.finish()
    return rows
