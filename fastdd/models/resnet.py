"""ResNet-18 / ResNet-18BN_AP of the DC references and IDC's ResNetAP-10 (avg-pool downsampling)."""
from __future__ import annotations

import math

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


def idc_stem(image_side: int) -> tuple[int, int]:
    """(conv kernel, avg-pool factor) of IDC's ResNetAP stem (snu-mllab/Efficient-Dataset-Condensation,
    models/resnet_ap.py, ImageNet branch) for images whose larger side is `image_side`: <= 64 px "small",
    <= 128 px "mid", larger "large". Every conv is stride 1 without bias."""
    if image_side <= 64:
        return 3, 1
    if image_side <= 128:
        return 3, 2
    return 7, 4


class ResNetAP10(nn.Module):
    """IDC's ResNetAP-10: stem, four stages of one BasicBlock (widths 64/128/256/512 times `width`), stride-2
    stages downsample by 2x2 avg-pool (after conv1 on the main path, after the 1x1 conv on the shortcut),
    global average pool -> features, linear classifier. width=0.5 is IDC's CIFAR ResNetAP-10 (32..256)."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32),
                 norm: str = "instancenorm", width: float = 1.0, name: str = "ResNetAP10"):
        super().__init__()
        base = int(64 * width)
        if base < 1:
            raise ValueError(f"{name}: width must give at least one stem channel, got width={width}")
        kernel, pool = idc_stem(max(image_size))
        self.stem_pool = pool
        self.stem_conv = nn.Conv2d(channels, base, kernel, stride=1, padding=kernel // 2, bias=False)
        self.stem_norm = make_resnet_norm(norm, base)
        height, width_px = image_size[0] // pool, image_size[1] // pool
        stages = []
        in_planes = base
        for stage, planes in enumerate((base, 2 * base, 4 * base, 8 * base)):
            stride = 1 if stage == 0 else 2
            stages.append(BasicBlock(in_planes, planes, stride, norm, avgpool_downsample=True))
            height, width_px = height // stride, width_px // stride
            in_planes = planes
        if height < 1 or width_px < 1:
            raise ValueError(f"{name} cannot take {image_size[0]}x{image_size[1]} images (they shrink to "
                             f"nothing after the /{pool} stem and three 2x downsamplings)")
        if norm == "instancenorm" and height * width_px == 1:
            raise ValueError(f"{name}: instance norm on the 1x1 final map of {image_size[0]}x{image_size[1]} "
                             f"images is degenerate; use ResNetAP10BN or larger images")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_shape = (in_planes, height, width_px)
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # IDC's init: He normal over fan-out (k*k*out)
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.stem_norm(self.stem_conv(x)))
        if self.stem_pool > 1:
            out = F.avg_pool2d(out, kernel_size=self.stem_pool, stride=self.stem_pool)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
