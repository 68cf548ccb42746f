"""Calibration: ECE against a hand computation, the temperature fit, and the temperature as a
checkpoint carries it to every reader (an old checkpoint without one is served with T = 1)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from checkpoints import trained_checkpoint
from synthetic import CLASSES

from simpsons import calibration, checkpoint
from simpsons.calibration import (
    calibrate,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    probabilities,
)
from simpsons.inference import load_checkpoint, load_classifier, predict_logits
from simpsons.recipe import create_eval_preset

# Four images, four classes: top-label confidences 0.9 (right), 0.92 (wrong), 0.5 (right), 0.3 (wrong).
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.03, 0.02],
        [0.04, 0.92, 0.02, 0.02],
        [0.50, 0.30, 0.10, 0.10],
        [0.30, 0.25, 0.25, 0.20],
    ]
)
LABELS = torch.tensor([0, 0, 0, 1])


def test_ece_is_the_binned_gap_between_confidence_and_accuracy_computed_by_hand():
    # 15 bins of width 1/15: 0.9 and 0.92 share (13/15, 14/15], 0.5 is in (7/15, 8/15], 0.3 in (4/15, 5/15].
    by_hand = 2 / 4 * abs(1 / 2 - (0.90 + 0.92) / 2) + 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(0 - 0.3)
    assert by_hand == pytest.approx(0.405)
    bins = calibration_bins(PROBS, LABELS)
    assert expected_calibration_error(bins) == pytest.approx(by_hand, abs=1e-6)
    assert bins[0].tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0]  # images per bin
    # Sums of batches (or of workers' shards) combine exactly, as confusion matrices do.
    halves = calibration_bins(PROBS[:2], LABELS[:2]) + calibration_bins(PROBS[2:], LABELS[2:])
    assert torch.equal(halves, bins)
    assert expected_calibration_error(calibration_bins(torch.eye(4), torch.arange(4))) == 0.0  # sure and right


def test_nll_is_the_mean_negative_log_probability_of_the_true_class():
    logits = PROBS.log()
    assert negative_log_likelihood(logits, LABELS) == pytest.approx(-np.log([0.90, 0.04, 0.50, 0.25]).mean())
    assert negative_log_likelihood(logits * 2, LABELS, temperature=2.0) == pytest.approx(
        negative_log_likelihood(logits, LABELS)
    )


def synthetic_logits(true_temperature: float, n: int = 20_000, classes: int = 10, seed: int = 0):
    """Logits z and labels drawn from softmax(z / true_temperature): a model whose logits are
    `true_temperature` times too sharp (> 1: overconfident), which the fit should find."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial((z / true_temperature).softmax(1), 1, generator=g).squeeze(1)
    return z.float(), labels


@pytest.mark.parametrize("true_temperature", [2.5, 0.6])
def test_fit_recovers_a_known_temperature_and_lowers_nll_and_ece(true_temperature):
    logits, labels = synthetic_logits(true_temperature)
    fitted = calibrate(logits, labels)
    assert fitted["temperature"] == pytest.approx(true_temperature, rel=0.05)
    assert fitted["nll_after"] <= fitted["nll_before"]
    assert fitted["ece_after"] < fitted["ece_before"] and fitted["ece_after"] < 0.02
    assert fit_temperature(logits, labels) == fitted["temperature"]  # deterministic
    # The argmax, so accuracy and F1, is unchanged; probabilities still sum to 1.
    calibrated = probabilities(logits, fitted["temperature"])
    assert torch.equal(calibrated.argmax(1), logits.argmax(1))
    assert torch.allclose(calibrated.sum(1), torch.ones(len(labels)))


def test_too_few_images_fall_back_to_no_temperature_with_a_warning(caplog):
    logits, labels = synthetic_logits(2.5, n=1)
    with caplog.at_level(logging.WARNING, logger="simpsons.calibration"):
        fitted = calibrate(logits, labels)
    assert fitted["temperature"] == 1.0 and fitted["images"] == 1
    assert fitted["ece_after"] == fitted["ece_before"]
    assert "validation split has 1 image(s)" in caplog.text


def test_splits_whose_optimum_is_at_zero_or_infinity_keep_the_temperature_in_bounds():
    low, high = calibration.TEMPERATURE_RANGE
    labels = torch.arange(40) % 4
    right = torch.nn.functional.one_hot(labels, 4).float() * 5  # every answer right: the optimum is T -> 0
    assert low <= fit_temperature(right, labels) < 1
    assert fit_temperature(-right, labels) == high  # every answer wrong: T -> infinity, uniform probabilities


def test_the_checkpoint_temperature_reaches_the_served_probabilities(tmp_path):
    best = trained_checkpoint(tmp_path / "best")
    assert checkpoint.temperature(checkpoint.load(best)) == 1.0  # written before calibration: T = 1
    images = np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    model, cfg, _, _ = load_checkpoint(best, "cpu")
    logits = predict_logits(model, images, create_eval_preset(cfg))
    uncalibrated = load_classifier(best, "cpu")
    assert torch.allclose(uncalibrated.probabilities(images), logits.softmax(1), atol=1e-6)

    checkpoint.save_temperature(best, 1.7)
    assert checkpoint.temperature(checkpoint.load(best)) == 1.7
    calibrated = load_classifier(best, "cpu")
    assert calibrated.class_names == list(CLASSES)
    assert torch.allclose(calibrated.probabilities(images), (logits / 1.7).softmax(1), atol=1e-6)
