import pytest
import torch
import torch.nn.functional as F

from simpsons.loss import FocalLoss, balance_alpha, resolve_alpha


def _batch(seed=0, n=64, c=42):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def test_gamma_zero_alpha_one_is_cross_entropy():
    logits, targets = _batch()
    torch.testing.assert_close(
        FocalLoss(alpha=None, gamma=0.0, label_smoothing=0.0)(logits, targets), F.cross_entropy(logits, targets)
    )


def test_gamma_zero_with_label_smoothing_is_smoothed_cross_entropy():
    logits, targets = _batch(1)
    got = FocalLoss(alpha=1.0, gamma=0.0, label_smoothing=0.1)(logits, targets)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets, label_smoothing=0.1))


def test_focal_term_down_weights_easy_examples():
    targets = torch.tensor([0, 0])
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.5, 0.0, 0.0]])  # one easy, one hard example
    ce = F.cross_entropy(logits, targets, reduction="none")
    fl = torch.stack(
        [FocalLoss(alpha=None, gamma=2.0, label_smoothing=0.0)(logits[i : i + 1], targets[i : i + 1]) for i in range(2)]
    )
    ratio = fl / ce
    # p_t = 0.995 for the easy one: (1 - p_t)^2 ~ 2.5e-5; the hard one keeps a large share of its loss.
    assert ratio[0] < 1e-3 < 0.1 < ratio[1] < 1
    assert torch.all(fl <= ce)


def test_per_class_alpha_weights_each_target():
    logits, targets = _batch(2, n=16, c=3)
    targets = targets % 3
    alpha = [1.0, 2.0, 0.5]
    per_example = F.cross_entropy(logits, targets, reduction="none") * torch.tensor(alpha)[targets]
    torch.testing.assert_close(
        FocalLoss(alpha=alpha, gamma=0.0, label_smoothing=0.0)(logits, targets), per_example.mean()
    )


def test_stable_in_bf16_logits():
    logits = torch.tensor([[80.0, -80.0]], dtype=torch.bfloat16)
    loss = FocalLoss(alpha=None, gamma=2.0, label_smoothing=0.0)(logits, torch.tensor([1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 100


def test_auto_alpha_favours_rare_classes_and_keeps_mean_weight_one():
    counts = [1000, 100, 10, 0]
    w = balance_alpha(counts)
    assert w[0] < w[1] < w[2]
    assert w[3] == max(w[:3])
    mean_per_image = sum(c * x for c, x in zip(counts, w)) / sum(counts)
    assert mean_per_image == pytest.approx(1.0)


def test_alpha_power_runs_from_equal_weights_to_inverse_frequency():
    counts = [400, 100, 25, 0]
    images = sum(counts)
    for power in (0.0, 0.25, 0.5, 1.0):
        w = balance_alpha(counts, power)
        assert sum(wi * c for wi, c in zip(w, counts)) / images == pytest.approx(1.0)  # mean weight per image
        assert w[1] / w[0] == pytest.approx(4.0**power) and w[2] / w[1] == pytest.approx(4.0**power)
        assert w[3] == max(w[:3])  # a class with no images
    assert balance_alpha(counts, 0.5) == resolve_alpha("auto", counts)  # "auto" is the default power
    assert resolve_alpha("auto", counts, 1.0) == balance_alpha(counts, 1.0)
    with pytest.raises(ValueError, match="alpha_power"):
        balance_alpha(counts, 1.5)


def test_resolve_alpha_checks_list_length():
    with pytest.raises(ValueError, match="3 values but there are 2 classes"):
        resolve_alpha([1, 2, 3], [5, 5])
    assert resolve_alpha(0.25, [5, 5]) == 0.25
