import pytest
import torch

from simpsons.config import ConfigError, load_config
from simpsons.model import create_model, zero_init_residual


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


@pytest.mark.parametrize("arch", ["original", "resnet18", "resnet50"])
def test_zero_init_residual_starts_every_block_as_the_identity(arch):
    model = zero_init_residual(create_model(42, arch=arch)).eval()
    blocks = [m for m in model.modules() if type(m).__name__ in ("ResidualBlock", "BasicBlock", "Bottleneck")]
    assert blocks
    for block in blocks:
        # The residual branch's output is 0, so the block returns relu(shortcut(x)).
        last_bn = block.conv2[1] if arch == "original" else getattr(block, "bn3", None) or block.bn2
        outputs = []  # a copy: torchvision's blocks add the shortcut into this tensor in place
        handle = last_bn.register_forward_hook(lambda module, args, out, outputs=outputs: outputs.append(out.clone()))
        block(torch.randn(2, block_in_channels(block), 8, 8))
        handle.remove()
        assert torch.count_nonzero(outputs[0]) == 0


def block_in_channels(block) -> int:
    return next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def test_zero_init_residual_is_refused_for_networks_without_residual_blocks():
    with pytest.raises(
        ConfigError, match="model.zero_init_residual applies to original, resnet18, resnet50, not convnext_tiny"
    ):
        load_config(None, ["model.arch=convnext_tiny", "model.zero_init_residual=true"])
