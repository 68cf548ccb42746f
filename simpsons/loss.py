"""Focal loss (Lin et al. 2017) for multi-class logits, with per-class alpha and label smoothing.

FL = -sum_c q_c * alpha_c * (1 - p_c)^gamma * log p_c, where q is the (optionally smoothed)
one-hot target, or a soft target (mixup, cutmix: the loss is then linear in it, so it equals the
share-weighted losses of the two labels). Without smoothing this is -alpha_t (1 - p_t)^gamma log p_t. It is computed from
log-softmax in fp32 whatever the autocast dtype, so bf16/fp16 logits cannot underflow log p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def balance_alpha(class_counts: Sequence[int], power: float = 0.5) -> list[float]:
    """Per-class weights proportional to count^-power, scaled so the mean weight per image is 1.

    power 0 weighs every class alike, 1 is inverse frequency (which lets a class of 3 images
    dominate), 0.5 (inverse square root) the usual middle ground and the default. A continuous
    exponent gives a sweep a real axis to search. A class with no images gets the largest weight
    of the others (it never appears in a batch, so the value only matters for completeness).
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"loss.alpha_power must be in [0, 1], not {power}.")
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("auto alpha needs at least one training image.")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].pow(-power)
    weights = weights / ((weights * counts).sum() / counts.sum())
    weights[~present] = weights[present].max()
    return weights.tolist()


def resolve_alpha(alpha, class_counts: Sequence[int], power: float = 0.5) -> list[float] | float | None:
    """Turn the config's alpha (None, number, list or 'auto': balance_alpha with `power`) into
    what FocalLoss takes."""
    if alpha == "auto":
        return balance_alpha(class_counts, power)
    if isinstance(alpha, list) and len(alpha) != len(class_counts):
        raise ValueError(f"loss.alpha has {len(alpha)} values but there are {len(class_counts)} classes.")
    return alpha


class FocalLoss(nn.Module):
    def __init__(self, alpha: float | Sequence[float] | None, gamma: float, label_smoothing: float):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma (the focal exponent) must be >= 0, not {gamma}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), not {label_smoothing}: 1 would leave no target.")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        if alpha is None or isinstance(alpha, (int, float)):
            self.scalar_alpha = 1.0 if alpha is None else float(alpha)
            self.register_buffer("alpha", None)
        else:
            self.scalar_alpha = 1.0
            self.register_buffer("alpha", torch.as_tensor(list(alpha), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits: (B, C) any float dtype; targets: (B,) int64 class indices or (B, C) class
        # distributions (rows summing to 1) -> scalar mean loss
        log_p = F.log_softmax(logits.float(), dim=1)  # (B, C) fp32
        num_classes = log_p.shape[1]
        target_dist = targets.float() if targets.dim() == 2 else F.one_hot(targets, num_classes).float()
        if self.label_smoothing:
            target_dist = target_dist * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        per_class = -log_p
        if self.gamma:
            per_class = per_class * (1 - log_p.exp()).clamp_min(0).pow(self.gamma)
        if self.alpha is not None:
            per_class = per_class * self.alpha
        loss = (target_dist * per_class).sum(dim=1)  # (B,)
        return self.scalar_alpha * loss.mean()
