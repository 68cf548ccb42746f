"""Calibrated probabilities: the one place logits become probabilities, the calibration figures
(ECE, NLL) and the temperature fitted on the validation split after training.

A network's top probability is rarely the share of such predictions that are right: trained to low
cross-entropy it is overconfident, and focal loss (this project's) often leaves it underconfident,
since the loss stops pushing once an image is easy. Temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks") divides the logits by one scalar T > 0 before the softmax; T is chosen to
minimise the validation split's negative log-likelihood. The argmax, so accuracy and F1, is unchanged.

ECE is top-label and binned like the metrics over a confusion matrix: `calibration_bins` sums
(images, confidence, correct) per bin, sums combine across batches and workers, and
`expected_calibration_error` reads the figure from the sums.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017
# Below this many validation images one image's confidence decides T: the fit is skipped (T = 1).
MIN_IMAGES = 10
# T is kept within these bounds: a split the model gets all right drives the NLL's optimum to T -> 0.
TEMPERATURE_RANGE = (0.05, 20.0)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, C) logits -> (B, C) fp32 class probabilities, softmax(logits / temperature)."""
    return (logits.float() / temperature).softmax(dim=1)


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """(3, bins) float64 sums over images of (count, top-label confidence, top label correct), image
    i in bin m when its confidence lies in (m / bins, (m + 1) / bins]; sums of batches add up."""
    confidence, predicted = probs.double().max(dim=1)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (0, 1/M] is bin 0
    rows = torch.stack([torch.ones_like(confidence), confidence, (predicted == labels).double()])
    return torch.zeros(3, bins, dtype=torch.float64, device=probs.device).index_add_(1, index, rows)


def expected_calibration_error(bins: torch.Tensor) -> float:
    """sum over bins of (bin's images / all images) * |accuracy - mean confidence| in the bin."""
    count, confidence, correct = bins.double().cpu()
    total = float(count.sum())
    return float((correct - confidence).abs().sum()) / total if total else 0.0


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean -log p(true class) of softmax(logits / temperature), in nats."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long())) if len(labels) else 0.0


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """{"ece", "nll"} of softmax(logits / temperature) against `labels`."""
    bins = calibration_bins(probabilities(logits, temperature), labels)
    return {"ece": expected_calibration_error(bins), "nll": negative_log_likelihood(logits, labels, temperature)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T), within TEMPERATURE_RANGE.

    L-BFGS on log T (so T stays positive) in float64 from T = 1, on the CPU: deterministic. The NLL
    is convex in 1 / T, so the one minimum is found; (N, C) logits, N of a validation split."""
    logits, labels = logits.detach().double().cpu(), labels.long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    temperature = float(log_t.detach().exp())
    return min(max(temperature, low), high) if math.isfinite(temperature) else 1.0


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The fitted temperature with the split's ECE and NLL before (T = 1) and after it:
    {"temperature", "images", "ece_before", "nll_before", "ece_after", "nll_after"}. With fewer than
    MIN_IMAGES images, T = 1 and a warning."""
    before = calibration_figures(logits, labels)
    temperature = 1.0
    if len(labels) < MIN_IMAGES:
        _logger.warning(
            "Calibration skipped: the validation split has %d image(s), fewer than the %d a temperature is "
            "fitted on; probabilities are served with T = 1.",
            len(labels),
            MIN_IMAGES,
        )
    else:
        temperature = fit_temperature(logits, labels)
    after = calibration_figures(logits, labels, temperature)
    if after["nll"] > before["nll"]:  # never serve worse probabilities than no fit (a fit stopped early)
        temperature, after = 1.0, before
    return {
        "temperature": temperature,
        "images": len(labels),
        "ece_before": before["ece"],
        "nll_before": before["nll"],
        "ece_after": after["ece"],
        "nll_after": after["nll"],
    }
