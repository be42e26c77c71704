"""ConvNet family of the DC/DSA/DM references, built from swappable ConvBlock modules."""
from __future__ import annotations

import torch
from torch import nn

from fastdd.ops.norm_act_pool import norm_act_pool

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
POOLINGS = ("avgpooling", "maxpooling", "none")


def uses_mnist_padding(channels: int, image_size: tuple[int, int]) -> bool:
    """True for 1-channel 28x28 inputs, which the references pad so the net sees 32 px."""
    return channels == 1 and tuple(image_size) == (28, 28)


def make_norm(kind: str, channels: int, height: int, width: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([channels, height, width], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


def make_activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    raise ValueError(f"unknown activation {kind!r}; valid: {', '.join(ACTIVATIONS)}")


def make_pooling(kind: str) -> nn.Module:
    if kind == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if kind == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {kind!r}; valid: {', '.join(POOLINGS)}")


class ConvBlock(nn.Module):
    """conv3x3 -> norm -> activation -> pooling; `tail` (norm -> act -> pool) is kept apart so a
    fused kernel can replace it."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str, activation: str,
                 pooling: str, conv_out_size: tuple[int, int], fused: bool = False):
        super().__init__()
        self.fused = fused
        self.norm_kind, self.activation_kind, self.pooling_kind = norm, activation, pooling
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding)
        self.norm = make_norm(norm, out_channels, *conv_out_size)
        self.act = make_activation(activation)
        self.pool = make_pooling(pooling)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return norm_act_pool(x, self.norm.weight, self.norm.bias, self.norm.eps)
        return self.pool(self.act(self.norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(x))


class ConvNet(nn.Module):
    """Depth x ConvBlock(width) followed by a linear classifier on the flattened features."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 activation: str = "relu", pooling: str = "avgpooling", name: str = "ConvNet",
                 fused: bool | None = None):
        super().__init__()
        fusable = norm == "instancenorm" and activation == "relu" and pooling == "avgpooling"
        if fused and not fusable:
            raise ValueError(f"{name}: fused=True needs norm='instancenorm', activation='relu' and "
                             f"pooling='avgpooling' (got {norm}, {activation}, {pooling})")
        fused = fusable if fused is None else bool(fused)
        if depth < 1:
            raise ValueError(f"{name}: depth must be >= 1, got {depth}")
        height, width_px = image_size
        blocks = []
        in_channels = channels
        for index in range(depth):
            padding = 3 if index == 0 and uses_mnist_padding(channels, image_size) else 1
            height, width_px = height + 2 * padding - 2, width_px + 2 * padding - 2
            if norm == "instancenorm" and height * width_px == 1:
                raise ValueError(f"{name}: instance norm on a 1x1 map (block {index + 1}) is degenerate")
            blocks.append(ConvBlock(in_channels, width, padding, norm, activation, pooling,
                                    (height, width_px), fused=fused and min(height, width_px) >= 2))
            if pooling != "none":
                height, width_px = height // 2, width_px // 2
            if height < 1 or width_px < 1:
                raise ValueError(
                    f"{name}: {image_size[0]}x{image_size[1]} images shrink to nothing at block "
                    f"{index + 1} of {depth}; use larger images, fewer blocks or pooling='none'")
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.feature_dim = width * height * width_px
        self.feature_shape = (width, height, width_px)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
