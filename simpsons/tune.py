"""Ray Tune sweeps: every trial is a whole distributed Ray Train run with sampled hyperparameters.

    sweep settings   the `tune:` section of a config file (SweepConfig below) + `--set tune.x=...`
    a trial          `run_trial`: the base config with the sampled values applied, fitted by the
                     same TorchTrainer as a single run (`simpsons.train.build_trainer`); a
                     TuneReportCallback hands every epoch's metrics to Tune, so ASHA can stop it
    the end          `export_sweep`: trials.csv, trials.png and the best trial's best checkpoint
                     exported exactly like a single run (`simpsons.export.export_best`)

Everything lands under `<run.storage>/<tune.name>/` (a local folder or s3://bucket/prefix):

    tuner.pkl, experiment_state-*.json   Tune's own state; `Tuner.restore` resumes from it
    trial-<id>/                          Tune's per-trial results (result.json, progress.csv)
    runs/<sweep>-<id>/                   each trial's Ray Train run: checkpoints, TensorBoard
    sweep.yaml                           the resolved base config and sweep settings
    trials.csv, trials.png               one row / one point per trial
    best/                                the winner: checkpoint.pt, metrics.json, per_class.csv, ...
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from simpsons import storage
from simpsons.config import Config, ConfigError, _set, from_dict, read_config_file, to_dict
from simpsons.checkpoint import METRICS_FILE
from simpsons.cluster import absolute_dataset_uri, init_ray, prepare_run
from simpsons.train import SCORE, build_trainer

# The custom resource that marks nodes safe for trial drivers (cluster.yaml's head advertises it).
TRIAL_DRIVER = "trial_driver"
EPOCHS = "epochs"  # epochs completed (1-based), added to every result Tune sees: ASHA's clock
SPACE_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass
class SweepConfig:
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
    scheduler: str = "asha"
    # ASHA: epochs every trial runs before it can be stopped (the first rung).
    grace_period: int = 1
    # ASHA: rungs at grace_period * rf^k epochs; at each, trials below the top 1/rf are stopped.
    reduction_factor: float = 2.0
    # "random" (Tune's random and grid search), "optuna" or "hyperopt" (need those packages).
    search: str = "random"
    # Seed of the search algorithm's sampling.
    seed: int = 0
    # Config key -> {uniform: [low, high]}, {loguniform: [low, high]}, {randint: [low, high]}
    # (inclusive), {choice: [values]} or {grid: [values]} (every value, num_samples times each).
    space: Any = field(default_factory=lambda: {
        "optim.lr": {"loguniform": [3e-4, 1e-2]},
        "loss.gamma": {"uniform": [0.0, 3.0]},
        "loss.alpha": {"choice": ["auto", 1.0]},
    })

    def validate(self) -> "SweepConfig":
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"tune.scheduler must be one of asha, fifo; got {self.scheduler!r}.")
        if self.search not in ("random", "optuna", "hyperopt"):
            raise ConfigError(f"tune.search must be one of random, optuna, hyperopt; got {self.search!r}.")
        if self.num_samples < 1:
            raise ConfigError(f"tune.num_samples must be at least 1, not {self.num_samples}.")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"tune.max_concurrent_trials must be 0 (fit the cluster) or more, not {self.max_concurrent_trials}.")
        if not self.trial_cpus > 0:
            raise ConfigError(f"tune.trial_cpus must be more than 0 (Ray refuses a zero-CPU trial), not {self.trial_cpus}.")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("tune.grace_period must be at least 1 and tune.reduction_factor more than 1.")
        if not isinstance(self.space, dict) or not self.space:
            raise ConfigError("tune.space must map config keys to ranges, e.g. {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}.")
        for key, spec in self.space.items():
            _parse_spec(key, spec)
        return self


# ---------------------------------------------------------------------------------------------
# Config: one YAML file holds the base training config and its `tune:` section


def load_sweep_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict, list[str], SweepConfig]:
    """Split a sweep config file and `--set` overrides into the training part and the sweep part.

    Returns (training sections of the file, training overrides, sweep settings). `--set
    tune.space.optim.lr={loguniform: [1.0e-4, 1.0e-2]}` sets one entry of the space (`null`
    removes it); every other `tune.*` key is a SweepConfig field.
    """
    values = read_config_file(path) if path is not None else {}
    sweep = SweepConfig()
    tune_values = values.pop("tune", None) or {}
    if not isinstance(tune_values, dict):
        raise ConfigError(f"The tune section of {path} must be a mapping, e.g. 'tune: {{num_samples: 4}}'.")
    for key, value in tune_values.items():
        _set(sweep, str(key), value, prefix="tune.")
    training_overrides = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not key.startswith("tune."):
            training_overrides.append(item)
            continue
        if not sep:
            raise ConfigError(f"Override {item!r} must look like tune.key=value, e.g. tune.num_samples=4.")
        value = yaml.safe_load(raw)
        if key.startswith("tune.space."):
            space_key = key[len("tune.space."):]
            sweep.space = {k: v for k, v in sweep.space.items() if k != space_key}
            if value is not None:
                sweep.space[space_key] = value
        else:
            _set(sweep, key[len("tune."):], value, prefix="tune.")
    return values, training_overrides, sweep.validate()


def section_overrides(sections: dict) -> list[str]:
    """The file's training sections as `section.key=value` overrides, applied before any --set.

    So `simpsons.config.load_config` (through `simpsons.cli.load_job_config`) checks every key
    and type of the sweep file exactly as it checks a training config.
    """
    def dump(value: Any) -> str:  # YAML flow text that reads back as the same value (1e-05 -> 1.0e-05)
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
        return text[:-3].strip() if text.endswith("...") else text

    overrides = []
    for section, body in sections.items():
        if isinstance(body, dict):
            overrides += [f"{section}.{key}={dump(value)}" for key, value in body.items()]
        else:
            overrides.append(f"{section}={dump(body)}")  # load_config says it needs a mapping
    return overrides


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted keys set, e.g. {"optim.lr": 1e-3}; unknown keys and wrong types raise."""
    nested = to_dict(cfg)
    for dotted, value in values.items():
        target = nested
        *sections, leaf = dotted.split(".")
        for part in sections:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Unknown config key '{dotted}': '{part}' is a value, not a section.")
        target[leaf] = value
    return from_dict(nested)  # names an unknown key in full, e.g. 'optim.lrr'


def check_space(cfg: Config, sweep: SweepConfig) -> None:
    """Fail before any trial starts if a space key or value would not make a valid config."""
    for key, spec in sweep.space.items():
        kind, args = _parse_spec(key, spec)
        for value in args:
            try:
                with_overrides(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key} ({kind} {args}): {exc}") from None


def _parse_spec(key: str, spec: Any) -> tuple[str, list]:
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
            raise ConfigError(f"tune.space.{key}: {kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}, not {args!r}.")
        args = [low, high]
    return kind, args


def search_space(sweep: SweepConfig) -> dict:
    """The Tune param_space: {config key: Tune domain}."""
    space = {}
    for key, spec in sweep.space.items():
        kind, args = _parse_spec(key, spec)
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
    Train checkpoint in the middle of training; the epoch count does not.
    """

    def after_report(self, run_context, metrics, checkpoint):
        metrics = [dict(m, **{EPOCHS: m["epoch"] + 1}) for m in metrics]
        super().after_report(run_context, metrics, checkpoint)


def trial_config(base: Config, params: dict, trial_id: str, sweep_uri: str) -> Config:
    """The config one trial trains with: base + sampled values, its own run folder under runs/."""
    name = f"{posixpath.basename(sweep_uri.rstrip('/'))}-{trial_id}"
    return with_overrides(base, {**params, "run.storage": storage.join(sweep_uri, "runs"), "run.name": name})


def run_trial(params: dict, base: dict, dataset: str, sweep_uri: str) -> None:
    """Tune function trainable: one whole Ray Train run with the sampled `params`.

    The Train run is named after the trial id, so a trial restarted by `Tuner.restore` continues
    from its own last checkpoint instead of starting over.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base), params, trial_id, sweep_uri)
    build_trainer(cfg, dataset, name=cfg.run.name, callbacks=[EpochReportCallback()]).fit()


class ProgressCallback(tune.Callback):
    """One line per trial start and end in the driver's log (Tune's table only comes every 30 s)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} started: {params}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get(EPOCHS, 0)
        how = "stopped early by the scheduler" if done < self.epochs else "completed"
        print(f"trial {trial.trial_id} {how} after {done}/{self.epochs} epochs: "
              f"val macro-F1 {result.get(SCORE, float('nan')):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed; its error is in {trial.path}/error.txt", flush=True)


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


def resolve_sweep_resources(cfg: Config, sweep: SweepConfig, dataset_uri: str | None = None) -> tuple[Config, int]:
    """(cfg with paths and resources settled and checked, trials that run at once).

    A sweep shares the cluster between trials, so an unset train.cpus_per_worker means 1 (not
    the single-run default of every CPU), and 0 concurrent trials means as many as fit.
    """
    if not cfg.train.cpus_per_worker:
        cfg = with_overrides(cfg, {"train.cpus_per_worker": 1.0})
    cfg = prepare_run(cfg, dataset_uri)
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
        raise ConfigError(
            f"One trial needs {per_trial:g} CPUs ({driver['CPU']:g} for its driver + {cfg.train.workers} workers x "
            f"{cfg.train.cpus_per_worker:g}){f' and {cfg.train.workers} GPUs' if cfg.train.use_gpu else ''} but the cluster "
            f"has {available.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} GPUs; lower train.workers or "
            f"train.cpus_per_worker, or set tune.max_concurrent_trials if the cluster autoscales."
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


def create_scheduler(cfg: Config, sweep: SweepConfig):
    if sweep.scheduler == "fifo":
        return None
    if sweep.grace_period > cfg.optim.epochs:
        raise ConfigError(f"tune.grace_period ({sweep.grace_period}) must not exceed optim.epochs ({cfg.optim.epochs}).")
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCHS, max_t=cfg.optim.epochs, grace_period=sweep.grace_period,
                         reduction_factor=sweep.reduction_factor)


def run_sweep(cfg: Config, sweep: SweepConfig, dataset_uri: str, resume: bool = False) -> list[dict]:
    """Run (or with resume=True, continue) the sweep, then export it; returns the trials.csv rows."""
    storage.check_writable(cfg.run.storage, cfg.run.s3_endpoint)  # before Ray starts: see train.fit
    init_ray()
    check_space(cfg, sweep)
    cfg, concurrent = resolve_sweep_resources(cfg, sweep, dataset_uri)
    dataset_uri = absolute_dataset_uri(dataset_uri)  # trials run in folders of their own
    sweep_uri = storage.join(cfg.run.storage, sweep.name)
    fs, root = storage.pyarrow_filesystem(cfg.run.storage, cfg.run.s3_endpoint)
    experiment_path = posixpath.join(root, sweep.name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), dataset=dataset_uri, sweep_uri=sweep_uri),
        trial_driver_resources(sweep),
    )
    exists = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if resume:
        if not exists:
            raise ConfigError(f"There is no sweep to resume at {sweep_uri}; run the same command without --resume to start it.")
        print(f"Resuming sweep {sweep.name} at {sweep_uri}: finished trials are kept, unfinished ones continue.", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        if exists:
            raise ConfigError(f"A sweep named {sweep.name!r} already exists at {sweep_uri}; add --resume to continue it "
                              f"or set tune.name to start another.")
        _upload_text(sweep_uri, "sweep.yaml", yaml.safe_dump({"tune": asdict(sweep), **to_dict(cfg)}, sort_keys=False),
                     cfg.run.s3_endpoint)
        print(f"Sweep {sweep.name}: {sweep.num_samples} trial(s), {concurrent} at a time, each {cfg.train.workers} "
              f"{'GPU' if cfg.train.use_gpu else 'CPU'} worker(s) x {cfg.optim.epochs} epochs, scheduler {sweep.scheduler}, "
              f"search {sweep.search} -> {sweep_uri}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=SCORE, mode="max", num_samples=sweep.num_samples,
                search_alg=create_searcher(sweep, concurrent), scheduler=create_scheduler(cfg, sweep),
                trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=root, storage_filesystem=fs, verbose=1,
                callbacks=[ProgressCallback(cfg.optim.epochs)],
                # A trial whose driver was lost (its node died) starts again; its Train run, named
                # after the trial, resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            ),
        )
    tuner.fit()
    return export_sweep(cfg, sweep_uri)


# ---------------------------------------------------------------------------------------------
# The end of a sweep: trials.csv, trials.png, best/


def summarize_trials(cfg: Config, sweep_uri: str) -> list[dict]:
    """One row per trial, best val macro-F1 first: params, best epoch's figures, epochs run, status."""
    fs, path = storage.pyarrow_filesystem(sweep_uri, cfg.run.s3_endpoint)
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=fs)
    rows = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        row = {"trial_id": trial.trial_id, **{k: v for k, v in trial.config.items()}}
        if frame is None or frame.empty or SCORE not in frame:
            row.update(status="error" if trial.status == "ERROR" else "no results", epochs_run=0)
            rows.append(row)
            continue
        frame = frame.dropna(subset=[SCORE])
        # Ties go to the later epoch: it is the one Ray Train keeps among equally scored checkpoints.
        best = frame.sort_values([SCORE, "epoch"]).iloc[-1]
        epochs_run = int(frame["epoch"].max()) + 1
        if trial.status == "ERROR":
            status = "error"
        else:
            status = "completed" if epochs_run >= cfg.optim.epochs else "stopped early"
        row.update(status=status, epochs_run=epochs_run, best_val_macro_f1=float(best[SCORE]),
                   best_epoch=int(best["epoch"]) + 1, val_acc=float(best["val_acc"]),
                   val_loss=float(best["val_loss"]), checkpoint=best.get("checkpoint_path", ""),
                   history=frame.drop_duplicates("epoch", keep="last").sort_values("epoch").to_dict("records"))
        rows.append(row)
    rows.sort(key=lambda r: r.get("best_val_macro_f1", -1.0), reverse=True)
    return rows


def export_sweep(cfg: Config, sweep_uri: str) -> list[dict]:
    """Write trials.csv and trials.png to the sweep folder and export the best trial to best/."""
    rows = summarize_trials(cfg, sweep_uri)
    if not rows or "best_val_macro_f1" not in rows[0]:
        raise RuntimeError(f"No trial of the sweep at {sweep_uri} reported a result; see the trials' error.txt there.")
    params = [k for k in rows[0] if "." in k]  # config keys, e.g. optim.lr
    columns = ["trial_id", "status", *params, "best_val_macro_f1", "best_epoch", "val_acc", "val_loss", "epochs_run", "checkpoint"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.csv").write_text(text.getvalue())
        plot_trials(rows, params, Path(tmp) / "trials.png", title=f"{posixpath.basename(sweep_uri)}: {len(rows)} trials")
        storage.upload_dir(tmp, sweep_uri, cfg.run.s3_endpoint)
    print(format_table(rows, params), flush=True)

    best = rows[0]
    best_cfg = trial_config(cfg, {k: best[k] for k in params}, best["trial_id"], sweep_uri)
    fs, _ = storage.pyarrow_filesystem(sweep_uri, cfg.run.s3_endpoint)
    checkpoint = ray.train.Checkpoint(best["checkpoint"], filesystem=fs)
    print(f"Best trial {best['trial_id']}: exporting its epoch {best['best_epoch']} checkpoint", flush=True)
    with checkpoint.as_directory() as ckpt_dir:
        from simpsons.export import export_best

        # The checkpoint's own history stops at its epoch; curves.png gets every epoch the trial
        # ran (Tune's copy of them, with the keys the training loop reports).
        keys = json.loads((Path(ckpt_dir) / METRICS_FILE).read_text())["history"][0].keys()
        history = [{k: epoch[k] for k in keys if k in epoch} for epoch in best["history"]]
        export_best(ckpt_dir, storage.join(sweep_uri, "best"), best_cfg, history=history)
    return rows


def format_table(rows: list[dict], params: list[str]) -> str:
    """The trials as a markdown table (also what the README's measured table is made of)."""
    head = ["trial", *params, "val macro-F1", "val acc", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        figures = [_fmt(r.get(p)) for p in params]
        f1 = f"{r['best_val_macro_f1']:.4f}" if "best_val_macro_f1" in r else "-"
        acc = f"{r['val_acc']:.4f}" if "val_acc" in r else "-"
        lines.append("| " + " | ".join([r["trial_id"], *figures, f1, acc, str(r["epochs_run"]), r["status"]]) + " |")
    return "\n".join(lines)


def plot_trials(rows: list[dict], params: list[str], path: str | Path, title: str = "") -> None:
    """Best val macro-F1 of every trial against each searched value (log axis for lr-like ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scored = [r for r in rows if "best_val_macro_f1" in r]
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4.2 * max(1, len(params)), 3.8), dpi=110, squeeze=False)
    styles = {"completed": ("o", "tab:blue"), "stopped early": ("v", "tab:orange"), "error": ("x", "tab:red")}
    for ax, param in zip(axes[0], params):
        values = [r[param] for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
            positive = [v for v in values if v > 0]
            if positive and len(positive) == len(values) and max(values) / min(values) >= 20:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # they overlap
        else:  # e.g. alpha chosen from 'auto' and numbers: one column per choice
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for status, (marker, colour) in styles.items():
            picked = [(x, r["best_val_macro_f1"]) for x, r in zip(xs, scored) if r["status"] == status]
            if picked:
                ax.scatter(*zip(*picked), marker=marker, color=colour, s=45, label=status)
        if scored:
            ax.scatter([xs[0]], [scored[0]["best_val_macro_f1"]], marker="*", s=220, facecolors="none",
                       edgecolors="black", label="best")
        ax.set_xlabel(param)
        ax.set_ylabel("best val macro-F1")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _upload_text(uri: str, name: str, text: str, endpoint: str = "") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(text)
        storage.upload_dir(tmp, uri, endpoint)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)
