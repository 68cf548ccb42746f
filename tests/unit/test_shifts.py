"""The robustness benchmark's shifts: same-size uint8 images, seeded, each a real change of the image."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import CLASSES

from simpsons.shifts import SHIFTS, apply_shift, shifted_scores

SIDE = 40


def photos(n: int = 6, seed: int = 0) -> np.ndarray:
    """(N, SIDE, SIDE, 3) uint8 images with many colours (gradients, texture and a bright patch),
    so that quantising, greying or re-encoding them must change them."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    out = np.empty((n, SIDE, SIDE, 3), dtype=np.uint8)
    for i in range(n):
        tint = rng.uniform(0.3, 1.0, size=3)
        across, down = np.meshgrid(ramp, ramp)
        x = np.stack([across * tint[0], down * tint[1], across * down[::-1] * tint[2]], -1)
        x = x * 200 + rng.normal(0, 12, size=(SIDE, SIDE, 3))
        top, left = rng.integers(0, SIDE // 2, size=2)
        x[top : top + SIDE // 3, left : left + SIDE // 3] = rng.uniform(150, 255, size=3)  # a character's flat colour
        out[i] = np.clip(x, 0, 255).astype(np.uint8)
    return out


IMAGES = photos()


@pytest.mark.parametrize("name", SHIFTS)
def test_a_shift_keeps_shape_and_dtype_changes_every_image_and_repeats_for_a_seed(name):
    before = IMAGES.copy()
    shifted = apply_shift(name, IMAGES, seed=3)
    assert shifted.shape == IMAGES.shape and shifted.dtype == np.uint8
    assert (shifted != IMAGES).any(axis=(1, 2, 3)).all(), f"{name} left an image unchanged"
    np.testing.assert_array_equal(apply_shift(name, IMAGES, seed=3), shifted)
    np.testing.assert_array_equal(IMAGES, before)  # the input is never written to


@pytest.mark.parametrize("name", SHIFTS)
def test_other_seeds_give_other_images_unless_the_shift_has_no_randomness(name):
    a, b = apply_shift(name, IMAGES, seed=0), apply_shift(name, IMAGES, seed=1)
    if name == "greyscale":
        np.testing.assert_array_equal(a, b)
    else:
        assert (a != b).any(), f"{name} ignores its seed"


def test_a_shift_takes_images_of_any_side_and_the_stored_memory_map(tmp_path):
    np.save(tmp_path / "val_images.npy", photos(3, seed=1)[:, :, :30])  # (3, 40, 30, 3): not square
    stored = np.load(tmp_path / "val_images.npy", mmap_mode="r")  # as load_packed hands the split over
    for name in SHIFTS:
        assert apply_shift(name, stored).shape == (3, SIDE, 30, 3), name


def test_greyscale_has_equal_channels():
    grey = apply_shift("greyscale", IMAGES)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_jpeg_is_a_real_encode_and_decode_at_quality_10_to_30():
    shifted = apply_shift("jpeg", IMAGES, seed=5)

    def recoded(image: np.ndarray, quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    for image, out in zip(IMAGES, shifted):
        matches = [q for q in range(1, 101) if np.array_equal(recoded(image, q), out)]
        assert matches and all(10 <= q <= 30 for q in matches), matches
    assert len({out.tobytes() for out in shifted}) == len(IMAGES)


def test_letterbox_puts_black_bars_on_two_opposite_sides():
    boxed = apply_shift("letterbox", IMAGES, seed=2)
    orientations = set()
    for image in boxed:
        black_rows, black_columns = ~image.any(axis=(1, 2)), ~image.any(axis=(0, 2))
        rows = black_rows.any()
        assert rows != black_columns.any(), "bars above and below, or left and right: one pair"
        black = black_rows if rows else black_columns
        first, last = np.flatnonzero(~black)[[0, -1]]  # the picture's extent across the bars
        assert not black[first : last + 1].any()  # one picture between the bars, no bar inside it
        # Centred, and squeezed to 55-75 % of the side (a pixel of rounding either way).
        assert abs(first - (SIDE - 1 - last)) <= 1
        assert 0.55 * SIDE - 1 <= last + 1 - first <= 0.75 * SIDE + 1
        orientations.add(bool(rows))
    assert orientations == {True, False}  # both kinds are drawn


def test_poster_leaves_at_most_8_colours():
    for image in apply_shift("poster", IMAGES):
        assert 2 <= len(np.unique(image.reshape(-1, 3), axis=0)) <= 8


def test_an_unknown_shift_or_a_wrong_image_type_is_one_sentence():
    with pytest.raises(ValueError, match="Unknown shift 'fog'; choose from brightness"):
        apply_shift("fog", IMAGES)
    with pytest.raises(ValueError, match=r"uint8 images, not float32 \(6, 40, 40, 3\)"):
        apply_shift("blur", IMAGES.astype(np.float32))


def test_shifted_scores_mean_is_the_mean_of_the_shifts_and_worst_the_lowest():
    # A "model" that names an image's brightest channel: right on the clean images by construction,
    # wrong where a shift moves colours.
    labels = IMAGES.astype(np.float32).mean(axis=(1, 2)).argmax(1)

    def probabilities(images: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.as_tensor(images.mean(axis=(1, 2)).argmax(1)), 3).float()

    scores = shifted_scores(probabilities, IMAGES, labels, ["red", "green", "blue"], seed=0)
    figures = {name: s["macro_f1"] for name, s in scores["shifts"].items()}
    assert list(figures) == list(SHIFTS) and scores["clean"] == {"macro_f1": 1.0, "accuracy": 1.0}
    assert scores["shifted_mean_macro_f1"] == pytest.approx(statistics.fmean(figures.values()))
    assert scores["worst_shift_macro_f1"] == min(figures.values()) == figures[scores["worst_shift"]]
    assert scores["worst_shift_macro_f1"] < 1.0  # greyscale alone ties every channel
    assert scores["shifted_mean_vs_clean"] == pytest.approx(scores["shifted_mean_macro_f1"])


def test_the_benchmark_scores_a_packed_split_only_at_the_models_side_and_classes(packed_dataset, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    from robustness import split_for

    from simpsons.data import DataError

    images, labels = split_for(packed_dataset, "val", list(CLASSES), 40)  # packed with the 42 names: re-indexed
    assert images.shape == (48, 40, 40, 3) and np.bincount(labels).tolist() == [12, 12, 12, 12]
    with pytest.raises(DataError, match="stored at 40 px, but the model takes 72 px; pass a dataset packed at"):
        split_for(packed_dataset, "val", list(CLASSES), 72)
    with pytest.raises(DataError, match=r"1 class\(es\) the model does not know \(marge_simpson\)"):
        split_for(packed_dataset, "val", list(CLASSES[:3]), 40)
