"""A checkpoint as training writes it, without training: for the tests of what reads one."""

from __future__ import annotations

from pathlib import Path

import torch
from synthetic import CLASSES

from simpsons.checkpoint import FORMAT, save
from simpsons.config import load_config, to_dict
from simpsons.model import create_model


def trained_checkpoint(folder: Path, *overrides: str) -> Path:
    """A checkpoint as training writes it, with weights nudged off their initial values (so BatchNorm
    statistics and the classifier are not trivial)."""
    cfg = load_config(None, ["data.stored_size=40", "data.train_size=32", *overrides])
    torch.manual_seed(0)
    model = create_model(len(CLASSES), cfg.model.head, cfg.model.dropout, cfg.model.arch).train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm running statistics away from (0, 1)
            model(torch.rand(8, 3, 32, 32) * 3)
    state = {"model": model.state_dict(), "config": to_dict(cfg), "class_names": list(CLASSES), "format": FORMAT}
    return save(folder, state, metrics={})
