"""Load a checkpoint and use it: evaluate on an image folder, predict top-k labels for images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simpsons import checkpoint
from simpsons.augment import eval_transform
from simpsons.config import Config, ConfigError, from_dict
from simpsons.data import (DataError, IMAGE_SUFFIXES, decode_failure, find_splits, load_image, pack_split, scan_split,
                           TreeProblems, too_large)
from simpsons.metrics import classification_report, confusion_matrix
from simpsons.model import classify, create_model

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


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> tuple[torch.nn.Module, Config, list[str], dict]:
    """(model in eval mode on `device` (default: resolve_device()), config, class names, raw state)."""
    device = resolve_device(device)
    path = checkpoint.checkpoint_file(path)
    state = checkpoint.load(path, device)
    try:
        cfg = from_dict(state["config"])
    except ConfigError as exc:
        raise DataError(f"{path} holds a config this code cannot read ({str(exc).rstrip('.')}); use the code version that wrote it.") from None
    class_names = list(state["class_names"])
    model = create_model(len(class_names), cfg.model.head, cfg.model.dropout, cfg.model.arch)
    try:
        model.load_state_dict(checkpoint.served_weights(state))
    except RuntimeError:  # torch lists every mismatched tensor over many lines
        raise DataError(f"{path} holds weights that do not fit this code's model; use the code version that wrote it.") from None
    model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, class_names, state


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray | torch.Tensor, train_size: int, batch_size: int = 128,
                  flip: bool = False) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, C) softmax probabilities in fp32 (`flip`: model.tta_flip)."""
    images = torch.as_tensor(images)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        out.append(classify(model, eval_transform(batch, train_size), flip).float().softmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate_folder(checkpoint: str | Path, folder: str | Path, split: str | None = None, workers: int = 0,
                    device: str | None = None) -> tuple[dict, np.ndarray, list[dict]]:
    """(report, confusion matrix, files left out) for a labelled folder `<folder>/<class>/*.jpg`.

    `folder` may also be a dataset root; then `split` (default: testset, else val) is evaluated.
    """
    model, cfg, class_names, _ = load_checkpoint(checkpoint, device)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass <folder>/<class>/*.jpg or a dataset root with train/val/testset.")
    if not any(p.is_dir() and p.name in class_names for p in folder.iterdir()):
        splits = find_splits(folder)
        split = split or ("testset" if "testset" in splits else "val")
        if split not in splits:
            raise DataError(f"{folder} has no '{split}' split; it has {', '.join(splits)}.")
        folder = splits[split]
    problems = TreeProblems()
    records = scan_split(folder, class_names, folder.parent, cfg.data.max_image_bytes, problems)
    problems.raise_if_any(len(class_names))
    if not records:
        raise DataError(f"No images of the checkpoint's {len(class_names)} classes under {folder}; pass <folder>/<class>/*.jpg.")
    packed = pack_split(records, cfg.data.stored_size, workers, desc="decode")
    probs = predict_proba(model, packed.images, cfg.data.train_size, flip=cfg.model.tta_flip)
    labels = torch.as_tensor(packed.labels.astype(np.int64))
    cm = confusion_matrix(labels, probs.argmax(1), len(class_names)).numpy()
    return classification_report(cm, class_names), cm, problems.unread + packed.bad_files


def predict_files(checkpoint: str | Path, paths: Sequence[str | Path], top_k: int = 3, device: str | None = None) -> list[dict]:
    """Top-k labels with probabilities for each image file (folders are expanded to their images)."""
    model, cfg, class_names, _ = load_checkpoint(checkpoint, device)
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
        if size > cfg.data.max_image_bytes:
            results.append({"path": str(f), "error": too_large(size, cfg.data.max_image_bytes)})
            continue
        try:
            images.append(load_image(f.read_bytes(), cfg.data.stored_size))
            kept.append(f)
        except Exception as exc:  # one unreadable file must not sink the others
            results.append({"path": str(f), "error": decode_failure(exc)})
    if kept:
        probs = predict_proba(model, np.stack(images), cfg.data.train_size, flip=cfg.model.tta_flip)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for f, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
            results.append({"path": str(f), "top": [{"label": class_names[i], "prob": v} for v, i in zip(values, indices)]})
    return results
