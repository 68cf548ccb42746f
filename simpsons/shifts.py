"""Image shifts that stand for what a deployed classifier meets, and a model's macro-F1 under them.

Each shift takes a batch of decoded images as the model is given them, (N, H, W, 3) uint8 at the
stored side, and a seeded numpy Generator, and returns a new batch of the same shape and dtype.
Its severity is fixed (a range per shift, in units of the image side where it is geometric);
each image's own parameters are drawn from the generator in batch order, so the same seed and
batch give the same images on any machine. What each shift stands for: docs/robustness.md.

    shifted = apply_shift("jpeg", images, seed=0)
    scores = shifted_scores(classifier.probabilities, images, labels, class_names, seed=0)
"""

from __future__ import annotations

import io
import statistics
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from simpsons.metrics import classification_report, confusion_matrix

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# ITU-R 601-2 luma, the weights PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _factors(rng: np.random.Generator, n: int, low: tuple[float, float], high: tuple[float, float]) -> np.ndarray:
    """(N,) factors, each drawn from `low` or `high` with equal chance: a shift either way, never none."""
    below = rng.uniform(*low, size=n)
    above = rng.uniform(*high, size=n)
    return np.where(rng.random(n) < 0.5, below, above).astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    # (N, H, W, 3) float32 -> (N, H, W, 1)
    return (x @ _LUMA)[..., None]


def _blend(x: np.ndarray, towards: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """towards + factor * (x - towards) per image (factor (N,)): torchvision's adjust_* arithmetic."""
    return towards + factor[:, None, None, None] * (x - towards)


def _each(images: np.ndarray, fn: Callable[[Image.Image, int], Image.Image]) -> np.ndarray:
    """fn(PIL image, index) for every image, back to one (N, H, W, 3) uint8 array of the input's size."""
    out = np.empty_like(images)
    for i, array in enumerate(images):
        image = fn(Image.fromarray(np.ascontiguousarray(array)), i).convert("RGB")
        if image.size != (array.shape[1], array.shape[0]):
            raise ValueError(f"a shift changed an image's size from {array.shape[1::-1]} to {image.size}")
        out[i] = np.asarray(image)
    return out


def brightness(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Under- or over-exposed frames: every pixel scaled by 0.45-0.65 or 1.4-1.8."""
    factor = _factors(rng, len(images), (0.45, 0.65), (1.4, 1.8))
    return _to_uint8(images.astype(np.float32) * factor[:, None, None, None])


def contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Washed-out or punchy grading: pixels moved away from or towards the image's mean grey, by 0.4-0.6 or 1.5-2."""
    x = images.astype(np.float32)
    mean = _luma(x).mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(_blend(x, mean, _factors(rng, len(x), (0.4, 0.6), (1.5, 2.0))))


def saturation(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faded or oversaturated colour: each pixel moved from its own grey by 0.1-0.4 or 1.8-2.5."""
    x = images.astype(np.float32)
    return _to_uint8(_blend(x, _luma(x), _factors(rng, len(x), (0.1, 0.4), (1.8, 2.5))))


def hue(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour cast (white balance, another season's palette): hue turned by 0.04-0.1 of the circle either way."""
    turn = np.rint(_factors(rng, len(images), (-0.1, -0.04), (0.04, 0.1)) * 256).astype(np.int64)

    def turned(image: Image.Image, i: int) -> Image.Image:
        h, s, v = image.convert("HSV").split()
        h = h.point(lambda value: (value + int(turn[i])) % 256)  # PIL's hue is a byte: 256 steps a turn
        return Image.merge("HSV", (h, s, v))

    return _each(images, turned)


def greyscale(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Black-and-white prints and filters: PIL's luma in all three channels (no randomness)."""
    return _each(images, lambda image, i: image.convert("L"))


def jpeg(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-encoded, heavily compressed uploads: a real JPEG encode and decode at quality 10-30."""
    quality = rng.integers(10, 31, size=len(images))

    def recoded(image: Image.Image, i: int) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality[i]))
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _each(images, recoded)


def blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out of focus or motion-softened frames: a Gaussian blur of 1.2-2.5 % of the image side (sigma)."""
    side = min(images.shape[1:3])
    radius = rng.uniform(0.012, 0.025, size=len(images)) * side
    return _each(images, lambda image, i: image.filter(ImageFilter.GaussianBlur(float(radius[i]))))


def noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise and film grain: Gaussian noise per pixel and channel, sigma 4-10 % of the range."""
    sigma = rng.uniform(0.04, 0.10, size=len(images)).astype(np.float32) * 255
    grain = rng.standard_normal(images.shape, dtype=np.float32) * sigma[:, None, None, None]
    return _to_uint8(images.astype(np.float32) + grain)


def downscale(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thumbnails and low-resolution sources blown up: shrunk to 30-50 % of the side, then resized back."""
    scale = rng.uniform(0.3, 0.5, size=len(images))

    def resampled(image: Image.Image, i: int) -> Image.Image:
        small = (max(2, round(image.width * scale[i])), max(2, round(image.height * scale[i])))
        return image.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)

    return _each(images, resampled)


def crop(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Off-centre framing (a screenshot of part of a scene): a square of 55-75 % of the side, pushed
    towards an edge on each axis (its free margin split 0-20 : 80-100), resized back to the full side."""
    n = len(images)
    size = rng.uniform(0.55, 0.75, size=n)
    toward_edge = np.where(rng.random((n, 2)) < 0.5, rng.uniform(0.0, 0.2, (n, 2)), rng.uniform(0.8, 1.0, (n, 2)))

    def cropped(image: Image.Image, i: int) -> Image.Image:
        w, h = image.width * size[i], image.height * size[i]
        left, top = (image.width - w) * toward_edge[i, 0], (image.height - h) * toward_edge[i, 1]
        return image.resize(image.size, Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))

    return _each(images, cropped)


def letterbox(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A frame of another aspect ratio fitted into the square with black bars (letterbox or
    pillarbox, either at random): the picture squeezed to 55-75 % of the side across the bars."""
    n = len(images)
    fraction = rng.uniform(0.55, 0.75, size=n)
    across_rows = rng.random(n) < 0.5  # True: bars above and below; False: left and right

    def boxed(image: Image.Image, i: int) -> Image.Image:
        w, h = image.size
        inner = (w, max(1, round(h * fraction[i]))) if across_rows[i] else (max(1, round(w * fraction[i])), h)
        canvas = Image.new("RGB", image.size)
        canvas.paste(image.resize(inner, Image.Resampling.BILINEAR), ((w - inner[0]) // 2, (h - inner[1]) // 2))
        return canvas

    return _each(images, boxed)


def poster(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fan art, stickers and posters: the image quantised to 4-8 colours (median cut, no dithering)."""
    colours = rng.integers(4, 9, size=len(images))
    return _each(
        images,
        lambda image, i: image.quantize(int(colours[i]), Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE),
    )


# The benchmark's fixed set, in its printing order. Names are figure names: lower case, no dots.
SHIFTS: dict[str, Shift] = {
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "hue": hue,
    "greyscale": greyscale,
    "jpeg": jpeg,
    "blur": blur,
    "noise": noise,
    "downscale": downscale,
    "crop": crop,
    "letterbox": letterbox,
    "poster": poster,
}


def shift_generator(name: str, seed: int) -> np.random.Generator:
    """The generator shift `name` draws from: one stream per (seed, shift), so adding or reordering
    shifts leaves every other shift's images as they were."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def apply_shift(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Shift `name` of SHIFTS applied to (N, H, W, 3) uint8 `images` with its seeded generator."""
    if name not in SHIFTS:
        raise ValueError(f"Unknown shift {name!r}; choose from {', '.join(SHIFTS)}.")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Shifts take (N, H, W, 3) uint8 images, not {images.dtype} {images.shape}.")
    return SHIFTS[name](images, shift_generator(name, seed))


def shifted_scores(
    probabilities: Callable[[np.ndarray], torch.Tensor],
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    seed: int = 0,
    shifts: Sequence[str] = tuple(SHIFTS),
) -> dict:
    """Macro-F1 and accuracy of a model on `images` as they are and under each shift.

    `probabilities` maps (N, S, S, 3) uint8 images to (N, C) class probabilities (a Classifier's:
    the model's own eval transform included); `labels` (N,) index `class_names`. Returns
    {"clean": {"macro_f1", "accuracy"}, "shifts": {name: {...}}, "shifted_mean_macro_f1",
    "worst_shift", "worst_shift_macro_f1", "shifted_mean_vs_clean"}.
    """
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def score(batch: np.ndarray) -> dict:
        predicted = probabilities(batch).argmax(1)
        report = classification_report(confusion_matrix(targets, predicted, len(class_names)), class_names)
        return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"]}

    clean = score(images)
    by_shift = {name: score(apply_shift(name, images, seed)) for name in shifts}
    mean = statistics.fmean(s["macro_f1"] for s in by_shift.values())
    worst = min(by_shift, key=lambda name: by_shift[name]["macro_f1"])
    return {
        "images": len(targets),
        "seed": seed,
        "clean": clean,
        "shifts": by_shift,
        "shifted_mean_macro_f1": mean,
        "worst_shift": worst,
        "worst_shift_macro_f1": by_shift[worst]["macro_f1"],
        "shifted_mean_vs_clean": mean / clean["macro_f1"] if clean["macro_f1"] > 0 else 0.0,
    }
