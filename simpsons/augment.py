"""Batched augmentation on the device: one affine warp per image does crop, flip and rotation.

Input batches are the packed uint8 images (B, S, S, 3). Training applies, per image, a random
resized crop (area fraction in `scale`, aspect ratio in `ratio`), a horizontal flip and a
rotation, all folded into one (2, 3) affine matrix so the whole batch is a single
`grid_sample` to the output size. Evaluation resizes the full image with antialiasing.

The robustness augmentations (each off unless its config key turns it on) are whole-batch tensor
ops too, every image drawing its own parameters from the step's generator:
- at the stored side S, before the warp, as a real photo is degraded before it is resized: a
  Gaussian blur (`gaussian_blur`) and a JPEG-like degradation (`jpeg_like`);
- at the output side T: colour jitter and random greyscale, folded into one 3x3 matrix per image
  (`colour_matrices`), then, after normalisation, random erasing (`erase_boxes`);
- across the batch (TrainPreset.mix, after the preset): mixup and cutmix, whose soft targets
  (`mixed_targets`) the focal loss takes.

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


# Rec. 601 luma weights: torchvision's rgb_to_grayscale and JPEG's Y channel.
LUMA = (0.299, 0.587, 0.114)

# Constant tensors per (values, shape, device, dtype). Built once: `torch.tensor(MEAN,
# device="cuda")` is a blocking host->device copy, and one per batch drains the GPU's queue.
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(
    values: tuple[float, ...], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): constants of the graph, never cached
        return torch.tensor(values, dtype=dtype).view(shape).to(device)
    key = (values, shape, device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype).view(shape).to(device)
    return _CONSTANTS[key]


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = (_constant(v, (1, 3, 1, 1), x.device, x.dtype) for v in (MEAN, STD))
    return (x - mean) / std


def random_affine(
    batch: int,
    scale: tuple[float, float],
    rotate_deg: float,
    hflip: bool,
    generator: torch.Generator | None,
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
    x = warp(_to_float(images), out_size, scale, rotate_deg, hflip, generator, ratio)
    return normalize(x).contiguous(memory_format=_layout(channels_last))


def warp(
    x: torch.Tensor,
    out_size: int,
    scale: tuple[float, float],
    rotate_deg: float,
    hflip: bool,
    generator: torch.Generator | None,
    ratio: tuple[float, float],
) -> torch.Tensor:
    """(B, 3, S, S) float -> (B, 3, out, out): random_affine's crop, flip and rotation, one grid_sample."""
    theta = random_affine(len(x), tuple(scale), rotate_deg, hflip, generator, device=x.device, ratio=tuple(ratio))
    grid = F.affine_grid(theta, [len(x), 3, out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Robustness augmentations: per-image parameters drawn on the device, no read of the device


def _chosen(u: torch.Tensor, probability: float) -> torch.Tensor:
    """(B,) bool: the images whose uniform draw `u` falls under `probability`."""
    return u < probability


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """(B, 3, H, W) float blurred by a Gaussian of `sigma` (B,) px per image (separable, one
    grouped convolution per axis for the whole batch). The kernel's radius, 3 x max_sigma, is fixed
    so the shapes never depend on the draws; a sigma near 0 gives a one-hot kernel (the image as it was)."""
    batch, channels, height, width = x.shape
    radius = math.ceil(3 * max_sigma)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)  # (K,)
    weights = (-(offsets**2) / (2 * sigma[:, None] ** 2)).exp()  # (B, K)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*3, K)
    z = x.reshape(1, batch * channels, height, width)  # every (image, channel) its own group
    z = F.pad(z, (radius, radius, radius, radius), mode="replicate")
    z = F.conv2d(z, weights.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    z = F.conv2d(z, weights.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return z.view(batch, channels, height, width)


# JPEG's quality-50 quantisation tables (ITU-T T.81 Annex K, libjpeg's): luminance and chrominance.
JPEG_LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
JPEG_CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *(99,) * 32,
)  # fmt: skip
# JFIF's RGB -> YCbCr on the 0-255 scale (Y centred on 0 as the DCT takes it, Cb and Cr centred
# on 0 as stored) and back, as (out, in) matrices.
_TO_YCC = (0.299, 0.587, 0.114, -0.168736, -0.331264, 0.5, 0.5, -0.418688, -0.081312)
_FROM_YCC = (1.0, 0.0, 1.402, 1.0, -0.344136, -0.714136, 1.0, 1.772, 0.0)
_Y_OFFSET = (128.0, 0.0, 0.0)
# The orthonormal 8-point DCT-II matrix D; an 8x8 block X flattened row by row has the 2-D
# coefficients D @ X @ D.T flattened alike = kron(D, D) @ X: one (64, 64) matmul per block.
_DCT = [
    [math.sqrt((1 if i == 0 else 2) / 8) * math.cos((2 * j + 1) * i * math.pi / 16) for j in range(8)] for i in range(8)
]
_DCT_2D = tuple(_DCT[i][j] * _DCT[k][m] for i in range(8) for k in range(8) for j in range(8) for m in range(8))


def jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] through what a JPEG encoder throws away, at `quality` (B,)
    (1-100, libjpeg's scaling of its tables): YCbCr, chroma averaged over 2x2 pixels (4:2:0),
    each 8x8 block's DCT coefficients rounded to the quality's steps, then decoded back. That is
    where the blocking, ringing and colour bleeding of real JPEG files come from; only the lossless
    entropy coding is left out. Real JPEG (PIL, torchvision.io) runs on the host, an image at a
    time, and downscale-upscale only blurs, which `blur` already does."""
    height, width = x.shape[-2:]
    to_ycc = _constant(tuple(255 * v for v in _TO_YCC), (3, 3), x.device)
    ycc = per_pixel(to_ycc, x) - _constant(_Y_OFFSET, (1, 3, 1, 1), x.device)  # (B, 3, H, W)
    # libjpeg: scale = 5000 / q below 50, 200 - 2q from 50; each step (table * scale + 50) / 100 in [1, 255]
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality)[:, None, None]  # (B, 1, 1)

    def steps(table: tuple[int, ...]) -> torch.Tensor:  # (B, 1, 64)
        table = _constant(tuple(float(t) for t in table), (1, 1, 64), x.device)
        return ((table * scale + 50) / 100).floor().clamp(1, 255)

    luma = _quantise(ycc[:, :1], steps(JPEG_LUMA_TABLE))
    chroma = _quantise(F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True), steps(JPEG_CHROMA_TABLE))
    chroma = F.interpolate(chroma, size=(2 * chroma.shape[-2], 2 * chroma.shape[-1]), mode="bilinear")
    ycc = torch.cat([luma, chroma[..., :height, :width]], dim=1)
    from_ycc = _constant(tuple(v / 255 for v in _FROM_YCC), (3, 3), x.device)
    return (per_pixel(from_ycc, ycc) + 128 / 255).clamp(0, 1)  # Y's offset, put back on every channel


def per_pixel(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) with every pixel's colour multiplied by `matrix` (3, 3), or (B, 3, 3) one per
    image: one matmul (a 1x1 convolution with 3 channels is 20-70x slower on the CPU)."""
    batch, channels, height, width = x.shape
    return (matrix @ x.reshape(batch, channels, height * width)).view(batch, channels, height, width)


def _quantise(z: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): every 8x8 block's DCT coefficients rounded to `steps` (B, 1, 64); H and W are
    padded (edge pixels repeated, as encoders do) to whole blocks and cropped back."""
    batch, channels, height, width = z.shape
    pad_h, pad_w = -height % 8, -width % 8
    if pad_h or pad_w:
        z = F.pad(z, (0, pad_w, 0, pad_h), mode="replicate")
    rows, cols = (height + pad_h) // 8, (width + pad_w) // 8
    blocks = z.reshape(batch, channels, rows, 8, cols, 8).permute(0, 1, 2, 4, 3, 5).reshape(batch, -1, 64)
    dct = _constant(_DCT_2D, (64, 64), z.device)
    coefficients = blocks @ dct.T  # (B, C * rows * cols, 64)
    coefficients = (coefficients / steps).round() * steps
    blocks = (coefficients @ dct).reshape(batch, channels, rows, cols, 8, 8).permute(0, 1, 2, 4, 3, 5)
    return blocks.reshape(batch, channels, rows * 8, cols * 8)[..., :height, :width]


# Hue rotation about the grey axis as one RGB matrix, A + cos(angle) B + sin(angle) C (the W3C
# filter effects' hueRotate): exact identity at angle 0, luminance kept, no round trip through HSV.
_HUE = (
    (0.213, 0.715, 0.072, 0.213, 0.715, 0.072, 0.213, 0.715, 0.072),
    (0.787, -0.715, -0.072, -0.213, 0.285, -0.072, -0.213, -0.715, 0.928),
    (-0.213, -0.715, 0.928, 0.143, 0.140, -0.283, -0.787, 0.715, 0.072),
)


def colour_matrices(
    batch: int,
    jitter: tuple[float, float, float, float],
    greyscale: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, torchvision's ColorJitter(brightness, contrast, saturation, hue) factors and
    RandomGrayscale(greyscale) as (B, 3, 3) matrices M and (B,) contrast factors c: the image
    becomes c * (M @ rgb) + (1 - c) * its mean grey. Brightness, saturation, hue and greyscale are
    linear in the pixel, so they fold into one matrix (one pass over the pixels); contrast's mean
    grey is linear in the image's mean colour."""
    brightness, contrast, saturation, hue = jitter
    u = torch.rand(batch, 5, generator=generator, device=device)

    def factor(strength: float, draw: torch.Tensor) -> torch.Tensor:  # uniform in [max(0, 1 - s), 1 + s]
        low = max(0.0, 1 - strength)
        return low + (1 + strength - low) * draw

    eye = torch.eye(3, device=device)
    grey = _constant(LUMA * 3, (3, 3), device)  # every output channel the luma: a grey image
    keep = factor(saturation, u[:, 2])[:, None, None]
    matrix = keep * eye + (1 - keep) * grey  # saturation: blend with the grey image
    angle = (math.tau * hue) * (2 * u[:, 3] - 1)[:, None, None]
    a, b, c = (_constant(m, (1, 3, 3), device) for m in _HUE)
    matrix = (a + angle.cos() * b + angle.sin() * c) @ matrix
    matrix = factor(brightness, u[:, 0])[:, None, None] * matrix
    matrix = torch.where(_chosen(u[:, 4], greyscale)[:, None, None], grey @ matrix, matrix)
    return matrix, factor(contrast, u[:, 1])


def jitter_colours(x: torch.Tensor, matrix: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] through colour_matrices' (matrix, contrast), clamped to [0, 1] once."""
    luma = _constant(LUMA, (1, 1, 3), x.device)
    y = per_pixel(matrix, x)
    mean_grey = (luma @ matrix @ x.mean(dim=(2, 3))[:, :, None]).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    c = contrast.view(-1, 1, 1, 1)
    return (c * y + (1 - c) * mean_grey).clamp(0, 1)


def box_masks(
    side: int, area: torch.Tensor, aspect: torch.Tensor, u_x: torch.Tensor, u_y: torch.Tensor
) -> torch.Tensor:
    """(B, side, side) bool: per image a box of `area` (fraction of the image) and `aspect` (w / h),
    placed inside the image at the fractions `u_x`, `u_y` of the room left (all (B,))."""
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    left, top = u_x * (1 - w), u_y * (1 - h)
    centres = (torch.arange(side, device=area.device, dtype=torch.float32) + 0.5) / side  # (side,)
    cols = (centres >= left[:, None]) & (centres < (left + w)[:, None])  # (B, side)
    rows = (centres >= top[:, None]) & (centres < (top + h)[:, None])
    return rows[:, :, None] & cols[:, None, :]


# Random erasing's box (Zhong et al. 2017; torchvision's RandomErasing): area 2-33 % of the image,
# aspect log-uniform in [0.3, 3.3].
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)


def erase_boxes(x: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 3, T, T) normalised: with `probability`, a random box of each image set to 0 (the mean colour)."""
    u = torch.rand(len(x), 5, generator=generator, device=x.device)
    area = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 0]
    log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = (log_low + (log_high - log_low) * u[:, 1]).exp()
    mask = box_masks(x.shape[-1], area, aspect, u[:, 2], u[:, 3]) & _chosen(u[:, 4], probability)[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def mix_batch(
    x: torch.Tensor, mixup: float, cutmix: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) of every image with its partner in the
    reversed batch (x.flip(0): the batch is already shuffled, so no permutation is drawn). Each image
    draws its share lam ~ Beta(alpha, alpha) and, with both on, mixup or cutmix at even odds. The
    share is folded to lam >= 0.5: the image stays the larger part of itself, so the training accuracy
    (argmax against the image's own label) counts the target's largest class, and the set of mixed
    pairs is the same as without folding (mixing a into b by lam is mixing b into a by 1 - lam).

    Returns (mixed x, share (B,) of each image's own label); mixed_targets turns it into soft targets."""
    batch, device = len(x), x.device
    u = torch.rand(batch, 3, generator=generator, device=device)
    use_cutmix = _chosen(u[:, 0], 0.5 if mixup and cutmix else float(bool(cutmix)))  # (B,)
    alpha = torch.where(use_cutmix, cutmix, mixup)
    # Beta(a, a) as G1 / (G1 + G2) with G ~ Gamma(a): torch.distributions.Beta takes no generator.
    gammas = torch._standard_gamma(alpha.expand(2, batch).contiguous(), generator=generator)
    total = gammas.sum(dim=0)
    lam = torch.where(total > 0, gammas[0] / total.clamp_min(1e-30), 1.0)  # both gammas underflow at tiny alpha
    lam = torch.maximum(lam, 1 - lam)  # (B,) in [0.5, 1]
    partner = x.flip(0)
    shares = lam
    mixed = None
    if mixup:
        mixed = torch.lerp(partner, x, lam.view(-1, 1, 1, 1).to(x.dtype))
    if cutmix:
        # A square box of area 1 - lam from the partner; the share is what the box leaves of the image.
        box = box_masks(x.shape[-1], 1 - lam, torch.ones_like(lam), u[:, 1], u[:, 2])
        cut = torch.where(box[:, None], partner, x)
        cut_share = 1 - box.float().mean(dim=(1, 2))
        mixed = cut if mixed is None else torch.where(use_cutmix[:, None, None, None], cut, mixed)
        shares = torch.where(use_cutmix, cut_share, lam)
    return mixed, shares


def mixed_targets(labels: torch.Tensor, share: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) soft targets of mix_batch's images: `share` of each image's label, the rest its partner's."""
    own = F.one_hot(labels, num_classes).float()
    share = share.view(-1, 1)
    return share * own + (1 - share) * own.flip(0)


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
    rotated with `generator`, and degraded as the robustness settings ask (or, with augment off,
    resized as in evaluation). `mix` then mixes the batch when mixup or cutmix is on.

    A probability, strength or alpha of 0 skips its step and draws nothing, so the output is bit
    for bit what it was without that setting. The augmentations run in fp32 whatever the
    caller's autocast."""

    train_size: int  # T, the side (px) the network sees
    crop_scale: tuple[float, float]  # crop area as a fraction of the stored image
    rotate_deg: float  # rotation uniform in [-rotate_deg, rotate_deg]
    hflip: bool  # horizontal flip with probability 0.5
    augment: bool  # False: no randomness at all (the original project's recipe)
    channels_last: bool  # output memory layout: channels_last, or contiguous NCHW
    crop_ratio: tuple[float, float]  # crop aspect ratio (w / h), log-uniform in this range
    colour_jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue strengths
    greyscale: float  # probability an image turns grey
    blur: float  # probability an image is blurred
    blur_sigma: tuple[float, float]  # the blur's sigma, uniform, as a fraction of the stored side
    jpeg: float  # probability an image goes through jpeg_like
    jpeg_quality: tuple[float, float]  # its quality, uniform in this range (1-100)
    erase: float  # probability an image has a random box erased
    mixup: float  # mixup's Beta alpha, 0 = off
    cutmix: float  # cutmix's Beta alpha, 0 = off

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.augment:
            return eval_transform(images, self.train_size, self.channels_last)
        with torch.autocast(images.device.type, enabled=False):
            x = _to_float(images)  # (B, 3, S, S)
            if self.blur:
                u = torch.rand(len(x), 2, generator=generator, device=x.device)
                low, high = (fraction * x.shape[-1] for fraction in self.blur_sigma)  # px
                sigma = torch.where(_chosen(u[:, 0], self.blur), low + (high - low) * u[:, 1], 1e-3)
                x = gaussian_blur(x, sigma, high)
            if self.jpeg:
                u = torch.rand(len(x), 2, generator=generator, device=x.device)
                low, high = self.jpeg_quality
                x = torch.where(
                    _chosen(u[:, 0], self.jpeg)[:, None, None, None], jpeg_like(x, low + (high - low) * u[:, 1]), x
                )
            x = warp(x, self.train_size, self.crop_scale, self.rotate_deg, self.hflip, generator, self.crop_ratio)
            if any(self.colour_jitter) or self.greyscale:
                x = jitter_colours(x, *colour_matrices(len(x), self.colour_jitter, self.greyscale, generator, x.device))
            x = normalize(x)
            if self.erase:
                x = erase_boxes(x, self.erase, generator)
            return x.contiguous(memory_format=_layout(self.channels_last))

    @property
    def mixes(self) -> bool:
        return self.augment and bool(self.mixup or self.cutmix)

    def mix(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x mixed, share (B,) of each image's own label), or (x, None) with mixup and cutmix off."""
        if not self.mixes:
            return x, None
        with torch.autocast(x.device.type, enabled=False):
            mixed, share = mix_batch(x, self.mixup, self.cutmix, generator)
        return mixed.contiguous(memory_format=_layout(self.channels_last)), share
