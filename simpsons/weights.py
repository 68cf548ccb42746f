"""Starting weights for `model.weights`: none, torchvision's ImageNet weights, or a state dict of yours.

    none        random initialisation (the original network always starts here: it has no
                published weights)
    imagenet    torchvision's published weights for `model.arch`, downloaded once per node into
                `<data.cache_dir>/weights/` with a progress bar; torch.hub checks the sha256 prefix
                that the file's name carries, and a partial download never takes the final name
    a path      a local file or an s3:// URI holding a state dict (or a checkpoint.pt of this
                project: its `model` is used)

Inputs are normalised with ImageNet's mean and std whatever the weights: every torchvision preset
these weights come with uses the same (tests/unit/test_backbones.py checks it).

Every tensor whose shape fits is loaded; the classifier's last layer, sized for other classes, is
left as initialised. A tensor outside the classifier that does not fit is an error: those weights
belong to another architecture.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
import torchvision

from simpsons import storage
from simpsons.data import DataError
from simpsons.files import fresh_partial, node_lock
from simpsons.model import is_head

_logger = logging.getLogger(__name__)


def pretrained(spec: str | None) -> bool:
    """Whether `model.weights` loads anything."""
    return bool(spec) and spec != "none"


def load_weights(
    model: torch.nn.Module, arch: str, spec: str | None, cache_dir: str | Path, endpoint: str = ""
) -> None:
    """Load `spec` (see the module's docstring) into `model`, a freshly created `arch`."""
    if not pretrained(spec):
        return
    if spec == "imagenet":
        path, source = imagenet_file(arch, cache_dir), f"torchvision's ImageNet weights for {arch}"
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        source = spec
        state = _read_state(spec, endpoint)
    _load_fitting(model, arch, state, source)


def imagenet_file(arch: str, cache_dir: str | Path) -> Path:
    """torchvision's ImageNet weights for `arch` in the node's cache, downloaded by the first
    process of the node that asks (the others wait on a file lock, then read it)."""
    url = _imagenet_weights(arch).url
    folder = Path(cache_dir).expanduser() / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / url.rsplit("/", 1)[-1]  # e.g. resnet18-f37072fd.pth: its sha256 starts f37072fd
    with node_lock(folder / ".lock"):
        if not path.is_file():
            partial = fresh_partial(path)
            hash_prefix = path.stem.rsplit("-", 1)[-1]
            _logger.info("Downloading %s -> %s", url, path)
            try:
                torch.hub.download_url_to_file(url, str(partial), hash_prefix=hash_prefix, progress=True)
            except RuntimeError as exc:  # torch.hub: "invalid hash value (expected ..., got ...)"
                partial.unlink(missing_ok=True)
                raise DataError(
                    f"The download of {url} does not match its published checksum ({exc}); "
                    f"run again, or set model.weights to a file you trust."
                ) from None
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise DataError(
                    f"Could not download {url} ({exc}); check this node's internet access, or put "
                    f"the file at {path} yourself, or set model.weights to a local path or s3:// URI."
                ) from None
            partial.replace(path)
    return path


def _imagenet_weights(arch: str):
    if arch == "original":
        raise DataError(
            "model.weights=imagenet needs a torchvision model.arch (resnet18, resnet50, efficientnet_b0, "
            "convnext_tiny, mobilenet_v3_large): the original network has no published ImageNet weights."
        )
    return torchvision.models.get_model_weights(arch).DEFAULT


def _read_state(spec: str, endpoint: str) -> dict:
    if storage.is_s3(spec):
        data = storage.read_bytes(spec, endpoint)
        if data is None:
            raise DataError(f"model.weights: there is no object at {spec}; give the URI of a saved state dict.")
        buffer = io.BytesIO(data)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(
                f"model.weights: {spec} is not a file; give 'none', 'imagenet', a state dict file or an s3:// URI."
            )
        buffer = path
    try:
        state = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception:  # foreign bytes: UnpicklingError, RuntimeError, EOFError, ...
        raise DataError(
            f"model.weights: torch cannot read {spec} as a state dict; save one with "
            f"torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint.pt of this project: start from its network
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"model.weights: {spec} does not hold a state dict (names -> tensors).")
    return state


def _load_fitting(model: torch.nn.Module, arch: str, state: dict, source: str) -> None:
    own = model.state_dict()
    misfits = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    foreign = [key for key in misfits if not is_head(arch, key)] + [key for key in state if key not in own]
    # Older published files (resnet18's of 2017) predate BatchNorm's num_batches_tracked counter.
    missing = [
        key for key in own if key not in state and not is_head(arch, key) and not key.endswith("num_batches_tracked")
    ]
    if foreign or missing:
        shown = ", ".join((foreign + missing)[:3])
        raise DataError(
            f"model.weights: {source} does not fit model.arch={arch} ({len(foreign)} tensor(s) of another "
            f"shape or name, {len(missing)} missing, e.g. {shown}); use weights saved from {arch}."
        )
    model.load_state_dict({key: value for key, value in state.items() if key not in misfits}, strict=False)
    kept = len(state) - len(misfits)
    _logger.info(
        "Loaded %d of %d tensors from %s; %s's classifier starts fresh where it is sized for other classes.",
        kept,
        len(own),
        source,
        arch,
    )
