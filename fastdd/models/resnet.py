"""ResNet-18 (instance norm or BatchNorm) and ResNet-18BN_AP (avg-pool downsampling) of the references."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_resnet_norm(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"ResNet norm must be 'instancenorm' or 'batchnorm', got {norm!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; downsampling by strided conv, or by 2x2 avg-pool when
    `avgpool_downsample` (the references' "_AP" variant)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avgpool_downsample: bool):
        super().__init__()
        self.pool_after_conv1 = avgpool_downsample and stride != 1
        conv1_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv1_stride, padding=1, bias=False)
        self.norm1 = make_resnet_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_resnet_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if avgpool_downsample:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=1, bias=False),
                    nn.AvgPool2d(kernel_size=2, stride=2), make_resnet_norm(norm, planes))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    make_resnet_norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        if self.pool_after_conv1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images. Plain variant: global average pool -> 512-d features (the
    reference's 4x4 avg-pool, made adaptive). AP variant: flattened final map (512*4*4 at 32 px)."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm", avgpool_downsample: bool = False, name: str = "ResNet18"):
        super().__init__()
        self.global_pool = not avgpool_downsample
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.norm1 = make_resnet_norm(norm, 64)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(
                BasicBlock(in_planes, planes, stride, norm, avgpool_downsample),
                BasicBlock(planes, planes, 1, norm, avgpool_downsample)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if avgpool_downsample:
            height, width = image_size[0] // 8, image_size[1] // 8
            if height < 1 or width < 1:
                raise ValueError(f"{name} cannot take {image_size[0]}x{image_size[1]} images (needs >= 8 px)")
            self.feature_dim = 512 * height * width
        else:
            if norm == "instancenorm" and max(image_size) <= 8:
                raise ValueError(f"{name}: instance norm on the 1x1 final map of {image_size[0]}x"
                                 f"{image_size[1]} images is degenerate; use ResNet18BN or > 8 px images")
            self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.global_pool:
            out = F.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
