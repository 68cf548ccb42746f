"""The networks: the original project's residual network (the default) and torchvision backbones.

The original (IlyaKarakulin/Classification-of-the-Simpsons, Model.py):

Layer for layer as published: a 5x5/2 stem, six residual blocks 64-64-128-128-256-256 with 1x1
projections where the stride is 2, global average pooling and a two-layer head. 2,934,570
parameters for 42 classes. The published head puts Dropout before ReLU; `head="standard"` gives
the usual Linear-BN-ReLU-Dropout order (same parameters, same shapes).

torchvision architectures (`model.arch`) get a classification layer for this run's classes; their
ImageNet weights, or a state dict of the user's, are loaded by simpsons.weights.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from simpsons.names import ARCHS, HEADS


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(out_channels),
        )
        # The original projects only where the block changes width and resolution.
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.projection is None else self.projection(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class SimpsonsNet(nn.Module):
    def __init__(self, num_classes: int, head: str, dropout: float):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=5, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.block1 = ResidualBlock(64, 64)
        self.block2 = ResidualBlock(64, 64)
        self.block3 = ResidualBlock(64, 128, stride=2)
        self.block4 = ResidualBlock(128, 128)
        self.block5 = ResidualBlock(128, 256, stride=2)
        self.block6 = ResidualBlock(256, 256)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if head == "original":
            tail = [nn.Dropout(dropout), nn.ReLU(inplace=True)]
        elif head == "standard":
            tail = [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        else:
            raise ValueError(f"model.head must be 'original' or 'standard', not {head!r}.")
        self.fc = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), *tail, nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) normalised images -> logits (B, num_classes)
        x = self.conv1(x)  # (B, 64, H/2, W/2)
        x = self.block2(self.block1(x))
        x = self.block4(self.block3(x))  # (B, 128, H/4, W/4)
        x = self.block6(self.block5(x))  # (B, 256, H/8, W/8)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 256)
        return self.fc(x)


def create_model(num_classes: int, head: str = "original", dropout: float = 0.2, arch: str = "original") -> nn.Module:
    """A freshly initialised network; `head` and `dropout` shape the original network's classifier
    (torchvision architectures keep their own). The defaults are the config's (simpsons.config.ModelConfig)."""
    if arch == "original":
        return SimpsonsNet(num_classes=num_classes, head=head, dropout=dropout)
    if arch not in HEADS:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, not {arch!r}.")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def zero_init_residual(model: nn.Module) -> nn.Module:
    """Every residual block starts as the identity: the last BatchNorm of its residual branch gets
    weight 0 (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; torchvision's zero_init_residual)."""
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.conv2[1].weight)
        elif isinstance(module, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(module.bn2.weight)
        elif isinstance(module, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(module.bn3.weight)
    return model


def is_head(arch: str, parameter_name: str) -> bool:
    """Whether a parameter (or state-dict key) belongs to the architecture's classifier."""
    return parameter_name.startswith(HEADS[arch] + ".")


def classify(model: nn.Module, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Logits (B, C) of normalised images x (B, 3, H, W); with `flip` (test-time augmentation) the
    mean of the logits of x and of its mirror image, as training also sees mirrored characters."""
    logits = model(x)
    return (logits + model(x.flip(3))) / 2 if flip else logits
