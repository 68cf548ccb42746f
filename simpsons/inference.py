"""Load a checkpoint and use it: evaluate on an image folder, predict top-k labels for images."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from simpsons import checkpoint, storage
from simpsons.archive import MAX_FILE_BYTES
from simpsons.augment import EvalPreset
from simpsons.calibration import calibration_figures, probabilities
from simpsons.checkpoint import CHECKPOINT_FILE, checkpoint_file
from simpsons.checkpoint import temperature as checkpoint_temperature
from simpsons.config import Config, ConfigError, training_config
from simpsons.data import (
    IMAGE_SUFFIXES,
    DataError,
    TreeProblems,
    decode_image,
    find_layout,
    pack_split,
    too_large,
)
from simpsons.dataset import load_packed
from simpsons.deploy import MODEL_FILE, is_exported, load_exported
from simpsons.files import file_sha256
from simpsons.metrics import classification_report, confusion_matrix
from simpsons.model import classify, create_model
from simpsons.names import CACHE_DIR
from simpsons.recipe import create_eval_preset
from simpsons.sources import fetch_source


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run a checkpoint on: `name`, or by default the first GPU when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"Unknown device {name!r}; pass cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"Device {name} asked for, but CUDA is not available on this machine; pass --device cpu.")
    return device


def load_checkpoint(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, Config, list[str], dict]:
    """(model in eval mode on `device` (default: resolve_device()), config, class names, raw state)."""
    device = resolve_device(device)
    path = checkpoint.checkpoint_file(path)
    state = checkpoint.load(path, device)
    try:
        cfg = training_config(state["config"])
    except ConfigError as exc:
        raise DataError(
            f"{path} holds a config this code cannot read ({str(exc).rstrip('.')}); use the code version that wrote it."
        ) from None
    class_names = list(state["class_names"])
    model = create_model(len(class_names), cfg.model.head, cfg.model.dropout, cfg.model.arch)
    try:
        model.load_state_dict(checkpoint.served_weights(state))
    except RuntimeError:  # torch lists every mismatched tensor over many lines
        raise DataError(
            f"{path} holds weights that do not fit this code's model; use the code version that wrote it."
        ) from None
    model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, class_names, state


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    preset: EvalPreset,
    batch_size: int = 128,
    flip: bool = False,
) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, C) logits in fp32 on the CPU, inputs made by `preset`
    (`flip`: model.tta_flip). A memory-mapped array is read one batch at a time."""
    device = next(model.parameters()).device
    images = images if isinstance(images, torch.Tensor) else np.asarray(images)  # a memmap stays mapped
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        out.append(classify(model, preset(batch.to(device)), flip).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predict_proba(
    model: torch.nn.Module, images: np.ndarray | torch.Tensor, preset: EvalPreset, temperature: float = 1.0, **options
) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, C) probabilities in fp32, softmax(logits / temperature);
    `options`: predict_logits' batch_size and flip."""
    return probabilities(predict_logits(model, images, preset, **options), temperature)


def split_logits(
    model: torch.nn.Module, cfg: Config, dataset_dir: str | Path, split: str = "val"
) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, C) fp32 logits as `model` serves them (cfg's preset and test-time flip), (N,) labels)
    of a packed dataset's split: what the calibration temperature is fitted on."""
    images, labels = load_packed(dataset_dir, split)  # images memory-mapped: only the logits stay
    return predict_logits(model, images, create_eval_preset(cfg), flip=cfg.model.tta_flip), torch.from_numpy(labels)


def evaluate_folder(
    checkpoint: str | Path,
    data: str | Path,
    split: str | None = None,
    workers: int = 0,
    device: str | None = None,
    cache_dir: str = CACHE_DIR,
) -> tuple[dict, np.ndarray, list[dict]]:
    """(report, confusion matrix, files left out) for labelled images; the report has the
    calibrated probabilities' ECE and NLL beside accuracy and F1.

    `data` is a labelled folder `<data>/<class>/*.jpg` (scored whole) or anything training's
    --data takes: a split tree, Kaggle's layout with its flat test set `<class>_<n>.jpg`, an
    archive or URL of one (fetched into `cache_dir`). Of a tree with splits, `split` (default:
    testset, else val) is scored.
    """
    model, cfg, class_names, state = load_checkpoint(checkpoint, device)
    layout = find_layout(fetch_source(data, cache_dir, max_image_bytes=cfg.data.max_image_bytes), class_names)
    available = [name for name in layout.names() if name != "unsplit"]  # "unsplit": class folders without a split
    if split is None:
        split = next((name for name in ("testset", "val") if name in available), "val" if available else "unsplit")
    if split not in layout.names():
        found = (
            f"it has {', '.join(available)}"
            if available
            else "it is not split: leave out --split to score all its images"
        )
        raise DataError(f"{data} has no '{split}' split; {found}.")
    folder = layout.folder(split)
    problems = TreeProblems(unread=[u for u in layout.unread if (layout.root / u["path"]).is_relative_to(folder)])
    records = layout.scan(split, class_names, cfg.data.max_image_bytes, problems)
    problems.raise_if_any(len(class_names))
    if not records:
        raise DataError(
            f"No images of the checkpoint's {len(class_names)} classes under {folder}; pass <folder>/<class>/*.jpg."
        )
    packed = pack_split(records, cfg.data.stored_size, workers, desc="decode")
    logits = predict_logits(model, packed.images, create_eval_preset(cfg), flip=cfg.model.tta_flip)
    labels = torch.as_tensor(packed.labels.astype(np.int64))
    cm = confusion_matrix(labels, logits.argmax(1), len(class_names)).numpy()
    report = classification_report(cm, class_names)
    temperature = checkpoint_temperature(state)
    per_class = report.pop("per_class")  # kept last in metrics.json, after the overall figures
    report.update(calibration_figures(logits, labels, temperature), temperature=temperature, per_class=per_class)
    return report, cm, problems.unread + packed.bad_files


@dataclass
class Classifier:
    """A loaded model as every use of it sees one: decoded images in, top-k labels out.

    `probabilities` takes (N, S, S, 3) uint8 images at `stored_size` S (what data.load_image
    makes) and returns (N, C) fp32 calibrated probabilities; `source` and `sha256` name the file the
    weights came from (the provenance written beside every prediction)."""

    probabilities: Callable[[np.ndarray], torch.Tensor]
    class_names: list[str]
    stored_size: int
    max_bytes: int  # larger image files are refused unread
    device: torch.device
    source: str
    sha256: str

    def top_k(self, images: np.ndarray, k: int) -> list[list[dict]]:
        """[[{"label", "prob"}, ... k of them, most probable first] per image]."""
        if len(images) == 0:
            return []
        top = self.probabilities(images).topk(min(k, len(self.class_names)), dim=1)
        return [
            [{"label": self.class_names[i], "prob": v} for v, i in zip(values, indices)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist())
        ]


def load_classifier(checkpoint: str | Path, device: str | torch.device | None = None) -> Classifier:
    """The model of a run's best/ folder (its checkpoint.pt), a checkpoint.pt, or an exported
    model.pt2, which needs none of the training code, on `device` (default: resolve_device())."""
    if is_exported(checkpoint):
        device = resolve_device(device)  # cuda without CUDA: one sentence, never a silent CPU run
        program, meta = load_exported(checkpoint, device)

        def exported_probabilities(images: np.ndarray) -> torch.Tensor:
            images = torch.as_tensor(images)
            with torch.no_grad():
                out = [program(images[i : i + 128].to(device)).cpu() for i in range(0, len(images), 128)]
            return torch.cat(out) if out else torch.empty(0)

        return Classifier(
            exported_probabilities,
            list(meta["class_names"]),
            meta["stored_size"],
            MAX_FILE_BYTES,
            device,
            str(checkpoint),
            file_sha256(checkpoint),
        )
    model, cfg, class_names, state = load_checkpoint(checkpoint, device)
    preset, temperature = create_eval_preset(cfg), checkpoint_temperature(state)

    def calibrated(images: np.ndarray) -> torch.Tensor:
        return predict_proba(model, images, preset, flip=cfg.model.tta_flip, temperature=temperature)

    path = checkpoint_file(checkpoint)
    return Classifier(
        calibrated,
        class_names,
        cfg.data.stored_size,
        cfg.data.max_image_bytes,
        next(model.parameters()).device,
        str(path),
        file_sha256(path),
    )


def open_classifier(checkpoint: str | Path, device: str | torch.device | None = None) -> Classifier:
    """load_classifier for a local path or an s3:// URI of a run's best/ folder (its checkpoint.pt,
    else its model.pt2) or of one of those files; `source` names the file read."""
    if not storage.is_s3(str(checkpoint)):
        return load_classifier(Path(checkpoint).expanduser().resolve(), device)
    uri = str(checkpoint).rstrip("/")
    names = (
        [uri] if Path(uri).suffix in (".pt", ".pt2") else [storage.join(uri, n) for n in (CHECKPOINT_FILE, MODEL_FILE)]
    )
    for name in names:
        data = storage.read_bytes(name)
        if data is not None:
            with tempfile.TemporaryDirectory() as folder:  # the loaded model no longer needs the file
                local = Path(folder) / Path(name).name
                local.write_bytes(data)
                return replace(load_classifier(local, device), source=name)
    raise DataError(
        f"No model at {checkpoint}; pass a run's best/ folder (with checkpoint.pt or model.pt2) or one of those files."
    )


def predict_files(
    checkpoint: str | Path, paths: Sequence[str | Path], top_k: int = 3, device: str | None = None
) -> list[dict]:
    """Top-k labels with probabilities for each image file (folders are expanded to their images).

    `checkpoint` is a run's best/ folder or checkpoint.pt, or its exported model.pt2, which needs
    none of the training code; either runs on `device` (default: the first GPU when there is one)."""
    classifier = load_classifier(checkpoint, device)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; pass image files or folders of images.")
    results, images, kept = [], [], []
    for f in files:
        size = f.stat().st_size
        if size > classifier.max_bytes:
            results.append({"path": str(f), "error": too_large(size, classifier.max_bytes)})
            continue
        image, reason = decode_image(f.read_bytes(), classifier.stored_size)
        if image is None:  # one unreadable file must not sink the others
            results.append({"path": str(f), "error": reason})
        else:
            images.append(image)
            kept.append(f)
    if kept:
        for f, top in zip(kept, classifier.top_k(np.stack(images), top_k)):
            results.append({"path": str(f), "top": top})
    return results
