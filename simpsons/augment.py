"""Batched augmentation on the device: one affine warp per image does crop, flip and rotation.

Input batches are the packed uint8 images (B, S, S, 3). Training applies, per image, a random
resized crop (area fraction in `scale`, aspect ratio in [3/4, 4/3]), a horizontal flip and a
rotation, all folded into one (2, 3) affine matrix so the whole batch is a single
`grid_sample` to the output size. Evaluation resizes the full image with antialiasing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ImageNet statistics, as the original project normalised with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    # (B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], channels_last memory (no copy of layout)
    return images.permute(0, 3, 1, 2).float().div_(255)


# (mean, std) as (1, 3, 1, 1) tensors per (device, dtype). Built once: `torch.tensor(MEAN,
# device="cuda")` is a blocking host->device copy, and one per batch drains the GPU's queue.
_STATS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor) -> torch.Tensor:
    key = (x.device, x.dtype)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1).to(x.device) for v in (MEAN, STD))
    mean, std = _STATS[key]
    return (x - mean) / std


def random_affine(batch: int, scale: tuple[float, float], rotate_deg: float, hflip: bool,
                  generator: torch.Generator, device: torch.device | str = "cpu",
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
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


def train_transform(images: torch.Tensor, out_size: int, scale=(0.6, 1.0), rotate_deg: float = 15.0,
                    hflip: bool = True, generator: torch.Generator | None = None,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, out, out) float32 normalised, randomly cropped/flipped/rotated."""
    x = _to_float(images)
    theta = random_affine(len(x), tuple(scale), rotate_deg, hflip, generator, device=x.device, ratio=ratio)
    grid = F.affine_grid(theta, [len(x), 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return normalize(x).contiguous(memory_format=torch.channels_last)


def eval_transform(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, out, out) float32 normalised, whole image resized."""
    x = _to_float(images)
    if x.shape[-1] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x).contiguous(memory_format=torch.channels_last)
