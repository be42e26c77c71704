"""MLP, LeNet, AlexNet(BN) and VGG11(BN) as in the DC/DSA/DM reference networks."""
from __future__ import annotations

import torch
from torch import nn

from .convnet import uses_mnist_padding
from .shapes import probe_feature_dim

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class MLP(nn.Module):
    """Two hidden ReLU layers on the flattened image; features are the second hidden layer."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 width: int = 128):
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * image_size[0] * image_size[1], width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU())
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5; features are the 84-d penultimate layer."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        first_padding = 2 if uses_mnist_padding(channels, image_size) else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=first_padding), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2))
        conv_dim = probe_feature_dim("LeNet", self, self.features, channels, image_size)
        self.hidden = nn.Sequential(nn.Linear(conv_dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _conv_unit(in_channels: int, out_channels: int, kernel_size: int, padding: int,
               batchnorm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU())
    return layers


class AlexNet(nn.Module):
    """The references' 5-conv AlexNet for 32 px images (optionally with BatchNorm)."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 batchnorm: bool = False):
        super().__init__()
        name = "AlexNetBN" if batchnorm else "AlexNet"
        first_padding = 4 if uses_mnist_padding(channels, image_size) else 2
        self.features = nn.Sequential(
            *_conv_unit(channels, 128, 5, first_padding, batchnorm), nn.MaxPool2d(2, 2),
            *_conv_unit(128, 192, 5, 2, batchnorm), nn.MaxPool2d(2, 2),
            *_conv_unit(192, 256, 3, 1, batchnorm),
            *_conv_unit(256, 192, 3, 1, batchnorm),
            *_conv_unit(192, 192, 3, 1, batchnorm), nn.MaxPool2d(2, 2))
        self.feature_dim = probe_feature_dim(name, self, self.features, channels, image_size)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class VGG11(nn.Module):
    """VGG-11 with instance norm (GroupNorm(C, C)) or BatchNorm after every conv."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm"):
        super().__init__()
        if norm not in ("instancenorm", "batchnorm"):
            raise ValueError(f"VGG11: norm must be 'instancenorm' or 'batchnorm', got {norm!r}")
        name = "VGG11BN" if norm == "batchnorm" else "VGG11"
        layers: list[nn.Module] = []
        in_channels = channels
        for index, entry in enumerate(VGG11_LAYOUT):
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            padding = 3 if index == 0 and uses_mnist_padding(channels, image_size) else 1
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=padding),
                       nn.GroupNorm(entry, entry, affine=True) if norm == "instancenorm"
                       else nn.BatchNorm2d(entry),
                       nn.ReLU()]
            in_channels = entry
        self.features = nn.Sequential(*layers)
        self.feature_dim = probe_feature_dim(name, self, self.features, channels, image_size)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
