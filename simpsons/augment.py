"""Batched augmentation on the device: one affine warp per image does crop, flip and rotation.

Input batches are the packed uint8 images (B, S, S, 3). Training applies, per image, a random
resized crop (area fraction in `scale`, aspect ratio in [3/4, 4/3]), a horizontal flip and a
rotation, all folded into one (2, 3) affine matrix so the whole batch is a single
`grid_sample` to the output size. Evaluation resizes the full image with antialiasing.

The training loop and inference use presets (torchvision's references/classification/presets.py
shape), built from the config by simpsons.recipe, then called per batch:

    x = train_preset(images, generator)       # (B, S, S, 3) uint8 -> (B, 3, T, T) float32
    x = eval_preset(images)                   # the whole image resized, no randomness

Outputs are in the layout the config asks for: channels_last memory, or contiguous NCHW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ImageNet statistics, as the original project normalised with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    # (B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], channels_last memory (a permuted view: no copy)
    return images.permute(0, 3, 1, 2).float().div_(255)


# (mean, std) as (1, 3, 1, 1) tensors per (device, dtype). Built once: `torch.tensor(MEAN,
# device="cuda")` is a blocking host->device copy, and one per batch drains the GPU's queue.
_STATS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): constants of the graph, never cached
        mean, std = _stats(x)
        return (x - mean) / std
    key = (x.device, x.dtype)
    if key not in _STATS:
        _STATS[key] = _stats(x)
    mean, std = _STATS[key]
    return (x - mean) / std


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1).to(x.device) for v in (MEAN, STD))


def random_affine(
    batch: int,
    scale: tuple[float, float],
    rotate_deg: float,
    hflip: bool,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """(B, 2, 3) matrices mapping output coords in [-1, 1] to input coords (affine_grid's convention)."""
    u = torch.rand(batch, 6, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]).exp()
    # Crop width/height as fractions of the image side; clamp keeps the crop inside the image.
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)
    cy = (1 - h) * (2 * u[:, 3] - 1)
    angle = math.radians(rotate_deg) * (2 * u[:, 4] - 1)
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if hflip else torch.ones(batch, device=device)
    cos, sin = angle.cos(), angle.sin()
    # Input = R(angle) @ diag(flip * w, h) @ output + centre: scale, flip, then rotate about the crop centre.
    theta = torch.stack(
        [
            torch.stack([cos * w * flip, -sin * h, cx], dim=1),
            torch.stack([sin * w * flip, cos * h, cy], dim=1),
        ],
        dim=1,
    )
    return theta


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def train_transform(
    images: torch.Tensor,
    out_size: int,
    scale: tuple[float, float],
    rotate_deg: float,
    hflip: bool,
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    channels_last: bool = True,
) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, out, out) float32 normalised, randomly cropped/flipped/rotated."""
    x = _to_float(images)
    theta = random_affine(len(x), tuple(scale), rotate_deg, hflip, generator, device=x.device, ratio=ratio)
    grid = F.affine_grid(theta, [len(x), 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return normalize(x).contiguous(memory_format=_layout(channels_last))


def eval_transform(images: torch.Tensor, out_size: int, channels_last: bool = True) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, out, out) float32 normalised, whole image resized."""
    x = _to_float(images)
    if x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x).contiguous(memory_format=_layout(channels_last))


# ---------------------------------------------------------------------------------------------
# Presets: the settings read once (simpsons.recipe builds them from a config)


@dataclass(frozen=True)
class EvalPreset:
    """Evaluation and inference inputs: (B, S, S, 3) uint8 -> (B, 3, T, T) float32, the whole image resized."""

    train_size: int  # T, the side (px) the network sees
    channels_last: bool  # output memory layout: channels_last, or contiguous NCHW

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return eval_transform(images, self.train_size, self.channels_last)


@dataclass(frozen=True)
class TrainPreset:
    """Training inputs: (B, S, S, 3) uint8 -> (B, 3, T, T) float32, randomly cropped, flipped and
    rotated with `generator` (or, with augment off, resized as in evaluation)."""

    train_size: int  # T, the side (px) the network sees
    crop_scale: tuple[float, float]  # crop area as a fraction of the stored image
    rotate_deg: float  # rotation uniform in [-rotate_deg, rotate_deg]
    hflip: bool  # horizontal flip with probability 0.5
    augment: bool  # False: no randomness at all (the original project's recipe)
    channels_last: bool  # output memory layout: channels_last, or contiguous NCHW

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.augment:
            return eval_transform(images, self.train_size, self.channels_last)
        return train_transform(
            images,
            self.train_size,
            self.crop_scale,
            self.rotate_deg,
            self.hflip,
            generator,
            channels_last=self.channels_last,
        )
