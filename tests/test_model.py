import pytest
import torch

from simpsons.model import create_model


def test_parameter_count_matches_the_original_network():
    model = create_model(42)
    assert sum(p.numel() for p in model.parameters()) == 2_934_570


@pytest.mark.parametrize("head", ["original", "standard"])
def test_output_shape_and_head_order(head):
    model = create_model(42, head=head).eval()
    logits = model(torch.randn(3, 3, 128, 128))
    assert logits.shape == (3, 42)
    kinds = [type(m).__name__ for m in model.fc]
    expected = ["Dropout", "ReLU"] if head == "original" else ["ReLU", "Dropout"]
    assert kinds == ["Linear", "BatchNorm1d", *expected, "Linear"]


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match="'original' or 'standard'"):
        create_model(42, head="wide")


def test_channels_last_gives_the_same_logits():
    model = create_model(42).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    cl = model.to(memory_format=torch.channels_last)
    got = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
