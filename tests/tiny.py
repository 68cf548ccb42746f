"""The small in-process setting the engine tests share: a config at 40 px stored, 32 px trained,
batch 8, and a split of random uint8 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simpsons.config import Config, load_config
from simpsons.data import CLASS_NAMES, ResidentSplit


def tiny_config(*overrides: str, path: str | Path | None = None) -> Config:
    """The defaults, or the config file at `path` (e.g. a recipe in configs/), at the tiny sizes."""
    return load_config(path, ["data.stored_size=40", "data.train_size=32", "optim.batch_size=8", *overrides])


def random_split(n: int, size: int = 40, **kwargs) -> ResidentSplit:
    rng = np.random.default_rng(0)
    return ResidentSplit(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, len(CLASS_NAMES), n), **kwargs
    )


# Every robustness augmentation on (simpsons.augment), strong enough that each changes most batches.
ALL_AUGMENTATIONS = (
    "data.crop_ratio=[0.5, 2.0]",
    "data.colour_jitter=[0.4, 0.4, 0.4, 0.1]",
    "data.greyscale=0.3",
    "data.blur=0.5",
    "data.jpeg=0.5",
    "data.erase=0.5",
    "data.mixup=0.4",
    "data.cutmix=1.0",
)
