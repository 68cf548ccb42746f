"""Experiment tracking in MLflow: one MLflow run per training run, across restarts; a sweep is a
parent run with one child run per trial.

Off unless run.tracking_uri (or MLFLOW_TRACKING_URI) names a tracking server. Who does what:

    driver, before Ray   `resolve` (the URI, run.experiment's default) and `check`: mlflow installed,
                         the server answers, the experiment exists (created) and takes writes
    driver, at the start `open_run` / `open_sweep`: the MLflow run tagged simpsons.run=<storage>/<name>
                         (simpsons.sweep=... for a sweep) is found and continued, or created; the
                         resolved config is logged as params
    rank 0, every epoch  `EpochLogger`: the epoch's figures (step = epoch) from a background thread, so
                         training never waits on the server; an outage is retried, said once, caught up
    driver, at the end   `TrackedRun.finish`: every epoch of the run's history not in MLflow yet, then
                         FINISHED; best/ was logged as artifacts by `TrackedRun.log_best`

Every epoch is logged once: an epoch whose figures the run already has (a resumed run repeats the
epoch its last checkpoint did not cover) is skipped. Nothing here fails training: past the checks,
an unreachable server only costs a warning. Another tracker would follow the same few calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from simpsons.config import Config, ConfigError, to_dict, training_dict, with_overrides
from simpsons.names import EVALUATED, LAST_SCORE, SCORE

_logger = logging.getLogger(__name__)

RUN_TAG = "simpsons.run"  # <run.storage>/<run.name>: finds a run's MLflow run again after a restart
SWEEP_TAG = "simpsons.sweep"  # <run.storage>/<tune.name>: the same for a sweep's parent run
TRIAL_STATUS_TAG = "simpsons.trial_status"  # completed / stopped early (by ASHA) / error
NOT_METRICS = ("epoch", "resumed")  # entries of an epoch's figures that are no metric
SKIPPED_ARTIFACTS = ("checkpoint.pt",)  # stays in run storage (tagged simpsons.best_uri): tens of MB
REQUEST_TIMEOUT_S = "20"  # one HTTP request to the server
FLUSH_S = 60.0  # how long rank 0 goes on sending after its last epoch before it leaves the rest to the driver
CATCH_UP_S = 300.0  # how long the driver goes on trying at the end before it gives up with a warning
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param's value


# ---------------------------------------------------------------------------------------------
# The driver's checks (before Ray starts)


def resolve(cfg: Config) -> Config:
    """cfg with run.tracking_uri settled on the driver: MLFLOW_TRACKING_URI when the config leaves it
    empty, a local path made absolute; and run.experiment defaulted to the run's name."""
    uri = cfg.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return cfg
    if not urlparse(uri).scheme:  # a local ./mlruns folder: workers run in folders of their own
        uri = str(Path(uri).expanduser().resolve())
    return with_overrides(cfg, {"run.tracking_uri": uri, "run.experiment": cfg.run.experiment or cfg.run.name})


def for_sweep(cfg: Config) -> Config:
    """A sweep's config: its experiment defaults to the sweep's name (tune.name), not the run's."""
    if cfg.run.experiment or not (cfg.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return cfg
    return with_overrides(cfg, {"run.experiment": cfg.tune.name})


def check(cfg: Config) -> None:
    """Refuse, in one sentence, a tracking URI that cannot work: mlflow missing, a password in the
    URI, no server answering, or an experiment this user may not write to (cfg from `resolve`)."""
    uri = cfg.run.tracking_uri
    if not uri:
        return
    if urlparse(uri).password:
        raise ConfigError(
            "run.tracking_uri holds a password, which would be logged with the config; put it in "
            "MLFLOW_TRACKING_PASSWORD (and the user in MLFLOW_TRACKING_USERNAME) or use MLFLOW_TRACKING_TOKEN."
        )
    if "'" in f"{cfg.run.storage}/{cfg.run.name}{cfg.tune.name}":
        raise ConfigError(
            "run.storage, run.name and tune.name must not hold a quote (') with run.tracking_uri set: the "
            "run is found again in MLflow by a tag holding them; rename it."
        )
    client = _client(uri)
    try:
        experiment_id = _experiment_id(client, cfg.run.experiment, uri)
        # A harmless write the run needs the same permission for (EDIT): refused now, not an epoch in.
        client.set_experiment_tag(experiment_id, "simpsons.last_started", f"{cfg.run.storage}/{cfg.run.name}")
    except ConfigError:
        raise
    except Exception as exc:  # connection refused, timeouts, HTTP errors: the server's own words
        raise _explain(exc, uri, cfg.run.experiment) from None


def _client(uri: str):
    """An MlflowClient that tries each request once (the callers here do the retrying, with a
    deadline), or ConfigError in one sentence when mlflow is not installed."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(
            f"run.tracking_uri is {uri}, but the mlflow package is not installed; pip install -e '.[mlflow]' "
            "(or pip install mlflow-skinny), or set run.tracking_uri empty to train without tracking."
        ) from None
    # Read by mlflow at every request; a user's own setting wins. Its default (7 retries with backoff,
    # 120 s timeouts) would make the check take minutes and hide an outage from the retry loops here.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name)
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"The MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set run.experiment to another name."
        )
    return experiment.experiment_id


def _explain(exc: BaseException, uri: str, experiment: str) -> ConfigError:
    status = _http_status(exc)
    if status in (401, 403):
        return ConfigError(
            f"The MLflow server at {uri} refuses this user write access to experiment {experiment!r} "
            f"(HTTP {status}); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, "
            "ask for EDIT permission on it, or set run.experiment to one you may write to."
        )
    return ConfigError(
        f"No MLflow tracking server answers at run.tracking_uri={uri} ({_reason(exc)}); start it (see docs/tracking.md), "
        "fix the URI, or set run.tracking_uri empty to train without tracking."
    )


def _reason(exc: BaseException) -> str:
    """The gist of a client error: "Connection refused" rather than urllib3's paragraph."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", text)
    return errno.group(1) if errno else text[:200]


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused request, None for a request that got no answer."""
    from mlflow.exceptions import RestException

    if isinstance(exc, RestException):  # the server answered with an MLflow error (JSON)
        return exc.get_http_status_code()
    # Any other answer (the basic-auth app's "Permission denied" is plain text) reaches us as
    # "... failed with error code 403 != 200. Response body: ...".
    code = re.search(r"failed with error code (\d{3}) != 200", str(exc))
    return int(code.group(1)) if code else None


# ---------------------------------------------------------------------------------------------
# What is logged


def config_params(cfg: Config | dict) -> dict[str, str]:
    """The resolved config as MLflow params: `section.key` -> the value, strings as they are and
    everything else as JSON (numbers, booleans, lists, mappings)."""
    values = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return {
        f"{section}.{key}": (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_LENGTH]
        for section, fields in values.items()
        for key, value in fields.items()
    }


def epoch_metrics(figures: dict) -> dict[str, float]:
    """The metrics of one epoch's figures (the training loop's `metrics` / a history entry). An
    epoch that train.evaluate_every skipped carries the last evaluated score, as Tune sees it."""
    if figures.get(EVALUATED) is False:
        figures = {**figures, SCORE: figures.get(LAST_SCORE, math.nan)}
    return {
        key: float(value)
        for key, value in figures.items()
        if key not in NOT_METRICS
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)  # the -inf score of an epoch without evaluation (train.evaluate_every)
    }


def run_tags(provenance: dict, world_size: int, device, dtype) -> dict[str, str]:
    """What a run trains on and with: dataset, its manifest's sha256, code version, world size,
    device (the GPU's name on CUDA) and the precision (`dtype`: autocast's, None for fp32)."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return {
        "simpsons.dataset_uri": provenance["dataset_uri"],
        "simpsons.manifest_sha256": provenance["manifest_sha256"],
        "simpsons.code_version": provenance["code_version"],
        "simpsons.world_size": str(world_size),
        "simpsons.device": name,
        "simpsons.precision": precision,
    }


# ---------------------------------------------------------------------------------------------
# Retrying


class GaveUp(Exception):
    """The server stayed away past the deadline."""


class _Patience:
    """Calls to the server, retried while it is down (connection errors, timeouts, HTTP 5xx and 429)
    until they succeed or a deadline passes; says once that it is down and once that it is back."""

    def __init__(self, uri: str):
        self.uri = uri
        self.deadline = float("inf")  # time.monotonic() after which a failing call gives up
        self.down_since = 0.0
        self.said = False

    def call(self, what: str, fn: Callable, *args):
        """fn(*args), retried; `what` names what waits on it in the one warning."""
        delay = 1.0
        while True:
            try:
                result = fn(*args)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if not self.down_since:
                    self.down_since = time.monotonic()
                if not self.said:
                    self.said = True
                    _logger.warning(
                        "MLflow at %s does not answer (%s); training goes on and %s is sent when it does.",
                        self.uri,
                        _reason(exc),
                        what,
                    )
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise GaveUp(f"MLflow at {self.uri} did not answer in time") from exc
                time.sleep(min(delay, remaining))  # the last try comes at the deadline
                delay = min(2 * delay, 15.0)
                continue
            if self.down_since:
                _logger.info(
                    "MLflow at %s answers again after %.0f s; catching up.",
                    self.uri,
                    time.monotonic() - self.down_since,
                )
                self.down_since = 0.0
            return result


def _transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, (MlflowException, OSError)):
        return False  # a bug, not an outage
    status = _http_status(exc)
    return status is None or status >= 500 or status == 429


def logged_epochs(client, run_id: str) -> set[int]:
    """The epochs (steps) the MLflow run has figures of."""
    return {metric.step for metric in client.get_metric_history(run_id, SCORE)}


def _log_epoch(client, run_id: str, epoch: int, figures: dict, timestamp_ms: int) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(key, value, timestamp_ms, epoch) for key, value in epoch_metrics(figures).items()]
    client.log_batch(run_id, metrics=metrics)  # one request: an epoch is in MLflow whole or not at all


# ---------------------------------------------------------------------------------------------
# Rank 0: every epoch's figures, in the background


class EpochLogger:
    """Rank 0's MLflow logger: `log_epoch` only queues; a thread sends, retrying while the server is
    down, and skips the epochs the run already has (a resumed run repeats one)."""

    def __init__(self, spec: dict, tags: dict[str, str]):
        self.run_id = spec["run_id"]
        self._patience = _Patience(spec["uri"])
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._thread = threading.Thread(target=self._send, args=(tags,), name="mlflow-epochs", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, spec: dict | None, tags: Callable[[], dict[str, str]]) -> EpochLogger | None:
        """The logger for the run `spec` names (from `TrackedRun.spec`), or None when tracking is off."""
        return cls(spec, tags()) if spec else None

    def log_epoch(self, figures: dict) -> None:
        self._queue.put((figures["epoch"], dict(figures), int(time.time() * 1000)))

    def close(self, timeout_s: float = FLUSH_S) -> None:
        """Send what is queued, for at most `timeout_s` (the driver catches up on the rest)."""
        self._queue.put(None)
        self._patience.deadline = time.monotonic() + timeout_s
        self._thread.join(timeout_s + float(REQUEST_TIMEOUT_S))
        if self._thread.is_alive() or not self._queue.empty():
            _logger.warning("MLflow got not every epoch from the workers; the driver sends the rest at the end.")

    def _send(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        try:
            client = _client(self._patience.uri)
            logged = self._patience.call("every epoch's metrics", logged_epochs, client, self.run_id)
            tags = [RunTag(key, value) for key, value in tags.items()]
            self._patience.call("the run's tags", client.log_batch, self.run_id, (), (), tags)
            while (item := self._queue.get()) is not None:
                epoch, figures, timestamp = item
                if epoch not in logged:
                    self._patience.call(
                        f"epoch {epoch + 1}", _log_epoch, client, self.run_id, epoch, figures, timestamp
                    )
                    logged.add(epoch)
        except GaveUp:
            return  # said by close(); the driver catches up
        except Exception as exc:  # never fail training over tracking
            _logger.warning("MLflow logging stopped: %s", str(exc)[:300])


# ---------------------------------------------------------------------------------------------
# The driver: the MLflow run of a training run, a sweep or a trial


class TrackedRun:
    """The MLflow run of a training run (or sweep, or trial), on the driver; `NoRun` when tracking is off."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self._client = _client(uri)
        self._patience = _Patience(uri)

    @property
    def spec(self) -> dict:
        """What rank 0 needs to log into this run (travels in the train loop's config)."""
        return {"uri": self.uri, "run_id": self.run_id}

    @property
    def trial_spec(self) -> dict:
        """What a sweep's trial needs to open its child run under this (parent) run."""
        return {**self.spec, "experiment_id": self.experiment_id}

    def _call(self, fn: Callable, what: str, deadline_s: float = CATCH_UP_S) -> bool:
        """fn() retried for up to `deadline_s`; False (with a warning) if the server stayed away."""
        self._patience.deadline = time.monotonic() + deadline_s
        try:
            self._patience.call(what, fn)
            return True
        except Exception as exc:  # the run's outputs are in its storage: never fail the job over tracking
            why = f"it did not answer for {deadline_s:.0f} s" if isinstance(exc, GaveUp) else _reason(exc)
            _logger.warning("MLflow at %s: %s is not in run %s (%s).", self.uri, what, self.run_id, why)
            return False

    def log_params(self, params: dict[str, str]) -> None:
        """Log params the run does not have yet; a value that changed since (a resumed run whose
        config was edited) keeps its first value, with a warning: MLflow refuses to change one."""
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            _logger.warning(
                "MLflow run %s keeps the values it was started with for %s.", self.run_id, ", ".join(changed)
            )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per request
            self._client.log_batch(self.run_id, params=new[start : start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]), "tags")

    def catch_up(self, history: list[dict], keys: tuple[str, ...] | None = None) -> None:
        """Log every epoch of `history` (the run's own record) that the MLflow run does not have;
        only `keys` of each entry when given."""

        def send() -> None:
            logged = logged_epochs(self._client, self.run_id)
            for figures in history:
                epoch = int(figures["epoch"])
                if epoch not in logged:
                    kept = {k: v for k, v in figures.items() if keys is None or k in keys}
                    _log_epoch(self._client, self.run_id, epoch, kept, int(time.time() * 1000))

        self._call(send, "every epoch's metrics")

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        """The files of `folder` (not its checkpoint.pt) under `artifact_path` in the run."""

        def send() -> None:
            for path in sorted(Path(folder).iterdir()):
                if path.is_file() and path.name not in SKIPPED_ARTIFACTS:
                    self._client.log_artifact(self.run_id, str(path), artifact_path or None)

        self._call(send, f"{artifact_path or 'the run'}'s files")

    def log_best(self, folder: str | Path, best_uri: str) -> None:
        """best/ as artifacts (a `report.write_best` publisher); its checkpoint.pt stays at best_uri."""
        self.log_artifacts(folder, "best")
        self.set_tags({"simpsons.best_uri": best_uri})

    def finish(self, history: list[dict] | None = None, status: str = "FINISHED", keys=None) -> None:
        """Catch up on `history` (see `catch_up`), then end the run with `status`."""
        if history:
            self.catch_up(history, keys)
        self._call(lambda: self._client.set_terminated(self.run_id, status), f"the run's status {status}")

    def fail(self) -> None:
        """The run ended in an error: FAILED, without waiting long (the error is what matters)."""
        self._call(lambda: self._client.set_terminated(self.run_id, "FAILED"), "the run's status FAILED", 10.0)


class NoRun:
    """Tracking is off: every call does nothing."""

    run_id = ""
    spec = trial_spec = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _open(
    cfg: Config, tag: str, key: str, name: str, *, fresh: bool, experiment_id: str = "", parent: str = ""
) -> TrackedRun:
    """The newest active MLflow run tagged `tag`=`key` in the experiment (unless `fresh`: a new run
    whose storage starts empty), set RUNNING again; or a new one."""
    uri = cfg.run.tracking_uri
    client = _client(uri)
    experiment_id = experiment_id or _experiment_id(client, cfg.run.experiment, uri)
    found = [] if fresh else client.search_runs([experiment_id], f"tags.`{tag}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        _logger.info("MLflow: continuing run %s (%s) in experiment %r at %s", run_id, name, cfg.run.experiment, uri)
    else:
        tags = {tag: key, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        _logger.info("MLflow: run %s (%s) in experiment %r at %s", run_id, name, cfg.run.experiment, uri)
    return TrackedRun(uri, run_id, experiment_id)


def open_run(cfg: Config, run_uri: str, fresh: bool) -> TrackedRun | NoRun:
    """The MLflow run of the training run at `run_uri` (= run.storage/run.name), its training
    sections logged as params; a new one when `fresh` (nothing of this run in its storage yet)."""
    if not cfg.run.tracking_uri:
        return NoRun()
    run = _open(cfg, RUN_TAG, run_uri, cfg.run.name, fresh=fresh)
    run.log_params(config_params(training_dict(cfg)))  # as best/config.yaml: no tune.*
    return run


def open_sweep(cfg: Config, sweep_uri: str, fresh: bool) -> TrackedRun | NoRun:
    """The sweep's parent run (its base config and tune.* as params)."""
    if not cfg.run.tracking_uri:
        return NoRun()
    run = _open(cfg, SWEEP_TAG, sweep_uri, cfg.tune.name, fresh=fresh)
    run.log_params(config_params(cfg))
    return run


def open_trial(cfg: Config, parent: dict | None, run_uri: str) -> TrackedRun | NoRun:
    """A trial's child run under the sweep's `parent` (its `spec` plus experiment_id), its config
    (the sampled values included) as params; found again when Tune restarts the trial."""
    if not parent:
        return NoRun()
    try:
        run = _open(
            cfg,
            RUN_TAG,
            run_uri,
            cfg.run.name,
            fresh=False,
            experiment_id=parent["experiment_id"],
            parent=parent["run_id"],
        )
        run.log_params(config_params(training_dict(cfg)))  # the sweep's tune.* are its parent's
    except Exception as exc:  # a trial trains all the same
        _logger.warning("MLflow at %s: trial %s is not tracked (%s).", parent["uri"], cfg.run.name, _reason(exc))
        return NoRun()
    return run


def finish_trials(cfg: Config, rows: list[dict], trial_uri: Callable[[str], str]) -> None:
    """At a sweep's end: each trial's child run gets the scheduler's decision as a tag, the epochs
    it missed (from Tune's record) and its final status."""
    if not cfg.run.tracking_uri:
        return
    client = _client(cfg.run.tracking_uri)
    experiment_id = _experiment_id(client, cfg.run.experiment, cfg.run.tracking_uri)
    for row in rows:
        key = trial_uri(row["trial_id"])
        found = client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
        if not found:
            continue
        run = TrackedRun(cfg.run.tracking_uri, found[0].info.run_id, experiment_id)
        run.set_tags({TRIAL_STATUS_TAG: row["status"], "simpsons.epochs_run": str(row["epochs_run"])})
        # Tune's record of an epoch also holds its own fields (time_total_s, pid, ...): only the
        # metrics rank 0 logs go in.
        keys = tuple(found[0].data.metrics) or (SCORE,)
        run.finish(row.get("history"), "FAILED" if row["status"] == "error" else "FINISHED", keys)
