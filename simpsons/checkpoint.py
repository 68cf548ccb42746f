"""The checkpoint: one folder per reported epoch, and the one module that knows its layout.

    checkpoint.pt   one plain dict that `torch.load(weights_only=True)` reads: model (unwrapped),
                    optimizer, scheduler, scaler, epoch, best_score, history, config, class_names,
                    provenance, `format` (checked on load), and with optim.ema_decay the moving
                    average's weights (`served`, what inference loads) and update count,
                    `tracking_run` (the MLflow run id with run.tracking_uri set, else ""); a
                    mid-epoch checkpoint (a preemption notice, train.checkpoint_every_steps) also
                    holds `progress`: how far its `epoch` got (train.EpochProgress as a dict); the
                    best/ folder's also holds `temperature`, the calibration fitted after training
                    (simpsons.calibration), which inference divides the logits by
    metrics.json    the epoch's validation report, confusion matrix, history and provenance (a
                    mid-epoch checkpoint: epoch, step, history and provenance; no validation)

Provenance ties a result to what produced it: the dataset URI, the sha256 of its manifest.json
(which lists the sha256 of every packed file) and the code version.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path

import torch

from simpsons import storage
from simpsons.config import ConfigError
from simpsons.data import DataError
from simpsons.dataset import manifest_bytes, manifest_sha256
from simpsons.files import sha256_hex

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
FORMAT = 1  # bump when the layout changes; load() refuses other versions
TEMPERATURE = "temperature"  # the key of best/'s calibration temperature
REQUIRED_KEYS = ("model", "config", "class_names")  # what training saves and inference needs


# ---------------------------------------------------------------------------------------------
# Writing


def training_state(model, optimizer, scheduler, scaler, ema=None, **extra) -> dict:
    """The checkpoint's plain dict, every tensor on the CPU. With `ema` (an AveragedModel of the
    weights), `served` holds its weights, which inference loads; `model` holds the raw weights,
    which training resumes from.

    CUDA tensors in it would make a plain `torch.load` fail on a machine without that GPU; the
    loader moves them to its own device (`restore`, `inference.load_checkpoint`).
    """
    return _to_cpu(
        {
            "model": getattr(model, "module", model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            **({"served": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)} if ema is not None else {}),
            "format": FORMAT,
            **extra,
        }
    )


def save(folder: str | Path, state: dict, metrics: dict) -> Path:
    """Write checkpoint.pt and metrics.json into `folder` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / CHECKPOINT_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(metrics))
    return folder


def provenance(dataset_uri: str, dataset_dir: str | Path, code: str) -> dict:
    """What produced a result: the dataset's URI, its manifest's sha256 and the code version."""
    return {"dataset_uri": dataset_uri, "manifest_sha256": manifest_sha256(dataset_dir), "code_version": code}


# The commit of code that runs without its .git folder (the image, a `ray job submit` working
# dir): the Dockerfile sets it from a build argument, and a submitter can pass it in the job's
# runtime environment (docs/cluster.md).
COMMIT_VARIABLE = "SIMPSONS_COMMIT"


def code_version() -> str:
    """The package version, with the git commit when the code runs from a checkout (`-dirty`
    when it has uncommitted changes) or when SIMPSONS_COMMIT names it. Asked on the driver: Ray
    ships workers no .git folder."""
    try:
        version = metadata.version("simpsons")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    commit = commit or os.environ.get(COMMIT_VARIABLE, "").strip()
    return f"{version}+git.{commit}" if commit else version


# ---------------------------------------------------------------------------------------------
# Reading


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The state dict saved by training (tensors on `device`), or a DataError in one sentence for
    any other file; `path` is a checkpoint folder or its checkpoint.pt."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise DataError(f"No checkpoint at {path}; pass a run's best/ folder or its checkpoint.pt.")
    fix = "pass a run's best/ folder or the checkpoint.pt in it"
    try:
        with warnings.catch_warnings():  # foreign bytes also draw a pickle-protocol warning: one sentence is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for foreign bytes
        raise DataError(f"{path} is not a checkpoint of this project (torch cannot read it); {fix}.") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DataError(
            f"{path} is a PyTorch file but not a checkpoint of this project (it has no {', '.join(missing)}); {fix}."
        )
    version = state.get("format", 1)  # checkpoints written before the version was recorded are version 1
    if version != FORMAT:
        raise DataError(
            f"{path} is a checkpoint of format version {version!r} and this code reads version "
            f"{FORMAT}; use the code version that wrote it."
        )
    return state


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint.pt of a checkpoint folder (a run's best/ included), or `path` itself."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() else path


def restore(state: dict, model, optimizer, scheduler, scaler, ema=None) -> None:
    """Load a checkpoint into this run's objects, whose settings may differ from the saving run's
    (an average not in the checkpoint starts from the restored weights)."""
    getattr(model, "module", model).load_state_dict(state["model"])
    if ema is not None and "served" in state:
        ema.module.load_state_dict(state["served"])
        ema.n_averaged.fill_(state["ema_updates"])
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


def resume_point(state: dict) -> tuple[int, dict | None]:
    """(the epoch a run resumed from `state` trains first, how far into it `state` got: its
    `progress` dict for a mid-epoch checkpoint, None for one saved at an epoch's end)."""
    if state.get("progress"):
        return state["epoch"], state["progress"]
    return state["epoch"] + 1, None


def served_weights(state: dict) -> dict:
    """The weights inference uses: the moving average when the run kept one, else the raw weights."""
    return state.get("served", state["model"])


def temperature(state: dict) -> float:
    """The calibration temperature inference divides the logits by: 1 for a checkpoint without one
    (a training checkpoint, or a best/ written before calibration)."""
    return float(state.get(TEMPERATURE, 1.0))


def save_temperature(path: str | Path, value: float) -> None:
    """Store the calibration temperature in the checkpoint at `path` (a folder or its checkpoint.pt)."""
    path = checkpoint_file(path)
    state = load(path, "cpu")
    state[TEMPERATURE] = float(value)
    torch.save(state, path)


def read_metrics(folder: str | Path) -> dict:
    """metrics.json of a checkpoint folder: {"epoch", "val", "confusion", "history", "provenance"}."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


def read_history(checkpoint) -> list[dict]:
    """The per-epoch metrics recorded in a reported Ray checkpoint."""
    with checkpoint.as_directory() as folder:
        return read_metrics(folder)["history"]


def check_resume(run_uri: str, dataset_uri: str, resume: bool, endpoint: str = "") -> None:
    """Before a run starts at `run_uri`: when an earlier run there reported checkpoints, refuse to
    resume it on other data (another manifest or class list: Ray Train would resume it silently),
    or, with `resume` false, move it aside to <run_uri>.replaced-<UTC time> so this run starts over."""
    reported = sorted(
        k.split("/")[0] for k in storage.list_objects(run_uri, endpoint) if k.endswith(f"/{METRICS_FILE}")
    )
    checkpoints = [name for name in reported if name.startswith("checkpoint_")]
    if not checkpoints:
        return
    if not resume:
        aside = f"{run_uri.rstrip('/')}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        storage.move(run_uri, aside, endpoint)
        _logger.info("run.resume=false: the earlier run at %s was moved to %s; starting over.", run_uri, aside)
        return
    earlier = json.loads(storage.read_bytes(storage.join(run_uri, checkpoints[-1], METRICS_FILE), endpoint) or b"{}")
    raw = manifest_bytes(dataset_uri, endpoint)
    ours = (sha256_hex(raw), json.loads(raw)["class_names"])
    theirs = (
        earlier.get("provenance", {}).get("manifest_sha256"),
        [row["class"] for row in earlier.get("val", {}).get("per_class", [])] or None,
    )
    if ours[0] != theirs[0] or (theirs[1] is not None and ours[1] != theirs[1]):
        were = earlier.get("provenance", {}).get("dataset_uri", "?")
        raise ConfigError(
            f"{run_uri} holds a run trained on {were} (manifest sha256 {str(theirs[0])[:12]}, "
            f"{len(theirs[1] or [])} classes), but this run trains on {dataset_uri} (manifest sha256 "
            f"{ours[0][:12]}, {len(ours[1])} classes) and would resume it; set run.resume=false to start it "
            f"over (the earlier run is moved aside, not deleted) or choose another run.name."
        )


def _to_cpu(value):
    """`value` with every tensor in it copied to the CPU (dicts, lists and tuples walked through)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value
