"""The robustness augmentations (simpsons.augment): each off by default and then bit for bit
today's preset, each changing the batch when on; shapes, ranges, seeds, autocast; JPEG against a
real JPEG file; mixup and cutmix targets and their loss."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import draw_example
from tiny import ALL_AUGMENTATIONS, tiny_config

from simpsons.augment import (
    MEAN,
    STD,
    colour_matrices,
    gaussian_blur,
    jitter_colours,
    jpeg_like,
    mix_batch,
    mixed_targets,
    train_transform,
)
from simpsons.loss import FocalLoss
from simpsons.recipe import create_train_preset

# One config key (or two) per augmentation, each on.
EACH = {
    "crop_ratio": ["data.crop_ratio=[0.3, 3.0]"],
    "colour_jitter": ["data.colour_jitter=[0.4, 0.4, 0.4, 0.1]"],
    "hue": ["data.colour_jitter=[0.0, 0.0, 0.0, 0.3]"],
    "greyscale": ["data.greyscale=0.5"],
    "blur": ["data.blur=0.5"],
    "jpeg": ["data.jpeg=0.5", "data.jpeg_quality=[5, 20]"],
    "erase": ["data.erase=0.5"],
    "mixup": ["data.mixup=0.4"],
    "cutmix": ["data.cutmix=1.0"],
    "all": list(ALL_AUGMENTATIONS),
}
LOW = (0 - max(MEAN)) / min(STD)  # the normalised range of [0, 1] pixels
HIGH = (1 - min(MEAN)) / min(STD)


def _images(n: int = 8, size: int = 40, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.stack([torch.from_numpy(np.asarray(draw_example(i, size, rng)).copy()) for i in range(n)])


def _augmented(overrides, seed: int = 0, images=None):
    """(inputs, share) of the config's preset and mix on a batch of drawn images, at `seed`."""
    preset = create_train_preset(tiny_config(*overrides))
    generator = torch.Generator().manual_seed(seed)
    x = preset(_images() if images is None else images, generator)
    return preset.mix(x, generator)


def test_with_every_augmentation_off_the_preset_is_todays_bit_for_bit():
    images = _images()
    cfg = tiny_config()
    x, share = _augmented([])
    d = cfg.data
    before = train_transform(
        images, d.train_size, tuple(d.crop_scale), d.rotate, d.hflip, torch.Generator().manual_seed(0)
    )
    assert share is None and torch.equal(x, before)


@pytest.mark.parametrize("name", EACH)
def test_each_augmentation_changes_the_batch_keeping_shape_dtype_range_and_seed(name):
    off, _ = _augmented([])
    on, share = _augmented(EACH[name])
    again, share_again = _augmented(EACH[name])
    other, _ = _augmented(EACH[name], seed=1)
    assert on.shape == (8, 3, 32, 32) and on.dtype == torch.float32
    assert on.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(on, off)
    assert torch.equal(on, again) and not torch.equal(on, other)  # deterministic for a seed
    assert LOW - 1e-4 <= on.min() and on.max() <= HIGH + 1e-4
    assert (share is not None) == (name in ("mixup", "cutmix", "all"))
    if share is not None:
        assert torch.equal(share, share_again) and share.min() >= 0.5 and share.max() <= 1


def test_augmentations_run_in_fp32_under_autocast():
    expected, _ = _augmented(ALL_AUGMENTATIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _augmented(ALL_AUGMENTATIONS)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_augment_off_turns_the_new_augmentations_off_too():
    # data.augment=false is the original recipe's plain resize: no key set since may add randomness.
    x, share = _augmented(["data.augment=false", *ALL_AUGMENTATIONS])
    plain, _ = _augmented(["data.augment=false"], seed=1)
    assert share is None and torch.equal(x, plain)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("quality", [10, 30, 75])
def test_jpeg_like_loses_what_a_real_jpeg_file_loses(quality):
    # 72 px: not a multiple of 16, so luma and half-size chroma both take padded blocks.
    rng = random.Random(3)
    peaks = []
    for i in range(4):
        image = draw_example(i, 72, rng)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)  # PIL's default: 4:2:0 chroma, libjpeg's tables
        real = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        clean, decoded = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None] / 255 for im in (image, real))
        ours = jpeg_like(clean, torch.tensor([float(quality)]))
        assert ours.shape == clean.shape
        peaks.append((_psnr(clean, decoded), _psnr(clean, ours), _psnr(decoded, ours)))
    real_loss, our_loss, between = np.mean(peaks, axis=0)
    assert abs(real_loss - our_loss) < 1.5  # as degraded as the real file (dB)
    assert between > real_loss + 6  # and degraded the same way: far closer to the real file than to the image


def test_blur_of_a_tiny_sigma_is_the_image_and_larger_sigmas_smooth_more():
    x = (_images(1).permute(0, 3, 1, 2).float() / 255).expand(3, -1, -1, -1)  # one image, three sigmas
    sigma = torch.tensor([1e-3, 1.0, 2.5])
    blurred = gaussian_blur(x, sigma, max_sigma=2.5)
    assert torch.equal(blurred[0], x[0])
    roughness = [float((b[..., 1:] - b[..., :-1]).abs().mean()) for b in blurred]
    assert roughness[0] > roughness[1] > roughness[2]
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)  # mass kept


def test_colour_matrices_keep_the_image_when_off_and_turn_it_grey():
    x = _images(4).permute(0, 3, 1, 2).float() / 255
    same = jitter_colours(x, *colour_matrices(4, (0.0, 0.0, 0.0, 0.0), 0.0, torch.Generator(), x.device))
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    grey = jitter_colours(x, *colour_matrices(4, (0.0, 0.0, 0.0, 0.0), 1.0, torch.Generator(), x.device))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    hue = jitter_colours(x, *colour_matrices(4, (0.0, 0.0, 0.0, 0.5), 0.0, torch.Generator().manual_seed(0), x.device))
    luma = torch.tensor([0.213, 0.715, 0.072]).view(1, 3, 1, 1)  # hue turns keep this luminance
    assert not torch.allclose(hue, x, atol=0.05)
    inside = (hue.amin(1) > 0) & (hue.amax(1) < 1)  # pixels the clamp to [0, 1] left alone
    torch.testing.assert_close((hue * luma).sum(1)[inside], (x * luma).sum(1)[inside], atol=2e-3, rtol=0)


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_sum_to_one_and_the_loss_is_the_hand_mixed_loss(mixup, cutmix):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, 42, (16,), generator=g)
    mixed, share = mix_batch(x, mixup, cutmix, torch.Generator().manual_seed(1))
    targets = mixed_targets(labels, share, 42)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert bool((share >= 0.5).all()) and not torch.equal(mixed, x)
    assert torch.equal(targets.argmax(1)[share > 0.5], labels[share > 0.5])  # the own label is the largest share
    # Each mixed image is its own image and its partner's (the reversed batch's) in the share's proportion.
    own = (mixed - x.flip(0)).abs().sum(1) / (x - x.flip(0)).abs().sum(1).clamp_min(1e-6)  # per pixel
    torch.testing.assert_close(own.mean(dim=(1, 2)), share, atol=1e-4, rtol=0)
    logits = torch.randn(16, 42, generator=g) * 3
    loss = FocalLoss(alpha=torch.rand(42, generator=g).tolist(), gamma=1.5, label_smoothing=0.05)
    by_hand = torch.stack(
        [
            share[i] * loss(logits[i : i + 1], labels[i : i + 1])
            + (1 - share[i]) * loss(logits[i : i + 1], labels.flip(0)[i : i + 1])
            for i in range(16)
        ]
    ).mean()
    torch.testing.assert_close(loss(logits, targets), by_hand)


def test_the_robust_config_loads_and_its_preset_augments():
    from pathlib import Path

    from simpsons.config import load_config
    from simpsons.driver import check_recipe

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "robust.yaml")
    check_recipe(cfg)
    preset = create_train_preset(cfg)
    assert preset.blur and preset.greyscale and not preset.jpeg and not any(preset.colour_jitter)
