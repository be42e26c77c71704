"""Model names as the references' get_network spells them, the resolution-dependent "auto" name, and get_model."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .classic import MLP, VGG11, AlexNet, LeNet
from .convnet import ConvNet
from .resnet import ResNet18, ResNetAP10

CONVNET_DEFAULTS = {"width": 128, "depth": 3, "norm": "instancenorm", "activation": "relu",
                    "pooling": "avgpooling", "fused": None}

CONVNET_VARIANTS: dict[str, dict[str, Any]] = {
    "ConvNet": {},
    **{f"ConvNetD{depth}": {"depth": depth} for depth in range(1, 7)},
    **{f"ConvNetW{width}": {"width": width} for width in (32, 64, 128, 256)},
    "ConvNetAS": {"activation": "sigmoid"},
    "ConvNetAR": {"activation": "relu"},
    "ConvNetAL": {"activation": "leakyrelu"},
    "ConvNetNN": {"norm": "none"},
    "ConvNetBN": {"norm": "batchnorm"},
    "ConvNetLN": {"norm": "layernorm"},
    "ConvNetIN": {"norm": "instancenorm"},
    "ConvNetGN": {"norm": "groupnorm"},
    "ConvNetNP": {"pooling": "none"},
    "ConvNetMP": {"pooling": "maxpooling"},
    "ConvNetAP": {"pooling": "avgpooling"},
}

OTHER_BUILDERS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "MLP": (MLP, {}),
    "LeNet": (LeNet, {}),
    "AlexNet": (AlexNet, {"batchnorm": False}),
    "AlexNetBN": (AlexNet, {"batchnorm": True}),
    "VGG11": (VGG11, {"norm": "instancenorm"}),
    "VGG11BN": (VGG11, {"norm": "batchnorm"}),
    "ResNet18": (ResNet18, {"norm": "instancenorm", "name": "ResNet18"}),
    "ResNet18BN": (ResNet18, {"norm": "batchnorm", "name": "ResNet18BN"}),
    "ResNet18BN_AP": (ResNet18, {"norm": "batchnorm", "avgpool_downsample": True,
                                 "name": "ResNet18BN_AP"}),
    # IDC's ImageNet model (argument.py: --net_type resnet_ap --depth 10, --norm_type instance by default);
    # IDC's --norm_type batch gives the BN variant.
    "ResNetAP10": (ResNetAP10, {"norm": "instancenorm", "name": "ResNetAP10"}),
    "ResNetAP10BN": (ResNetAP10, {"norm": "batchnorm", "name": "ResNetAP10BN"}),
}

AUTO_MODEL = "auto"

# "auto": the ConvNet depth the references pair with each resolution, so the final map stays 4x4 (2048
# features): depth 3 at 32 px (DC/DSA/DM, VICO-UoE/DatasetCondensation utils.get_default_convnet_setting),
# ConvNetD4 on Tiny ImageNet at 64 px and ConvNetD5 on ImageNet subsets at 128 px
# (GeorgeCazenavette/mtt-distillation readme and paper; GLaD's --depth default 5 at --res 128), depth 6 at
# 256 px (GLaD's 256 px setting). An image size between two entries takes the entry with the largest
# resolution <= its shorter side; sizes below 32 px take ConvNet, sizes above 256 px ConvNetD6.
AUTO_DEPTH_BY_RESOLUTION: tuple[tuple[int, str], ...] = (
    (32, "ConvNet"), (64, "ConvNetD4"), (128, "ConvNetD5"), (256, "ConvNetD6"))

CONCRETE_MODELS: tuple[str, ...] = tuple(CONVNET_VARIANTS) + tuple(OTHER_BUILDERS)
MODELS: tuple[str, ...] = (AUTO_MODEL,) + CONCRETE_MODELS


def as_image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def resolve_model_name(name: str, image_size: int | tuple[int, int]) -> str:
    """The concrete model name: "auto" becomes the references' ConvNet depth for `image_size` (see
    AUTO_DEPTH_BY_RESOLUTION); a known name is returned unchanged; anything else is a ValueError."""
    if name == AUTO_MODEL:
        try:
            shorter_side = min(as_image_size(image_size))
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
        if shorter_side < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        chosen = AUTO_DEPTH_BY_RESOLUTION[0][1]
        for resolution, model_name in AUTO_DEPTH_BY_RESOLUTION:
            if resolution <= shorter_side:
                chosen = model_name
        return chosen
    if name in CONCRETE_MODELS:
        return name
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def uses_batchnorm(net: nn.Module) -> bool:
    """True when `net` has a BatchNorm layer: its outputs depend on the other rows of the batch (train mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def unfused_if_convnet(name: str) -> dict:
    """get_model overrides for a ConvNet of nn modules (GroupNorm/ReLU/AvgPool2d); {} for other models."""
    return {"fused": False} if name in CONVNET_VARIANTS else {}


def get_model(name: str, channels: int, num_classes: int, image_size: int | tuple[int, int],
              **overrides: Any) -> nn.Module:
    """Build model `name` ("auto": see resolve_model_name) for [N, channels, H, W] inputs. ConvNet names
    accept overrides width, depth, norm, activation, pooling; other models accept their constructor keywords."""
    name = resolve_model_name(name, image_size)
    size = as_image_size(image_size)
    if name in CONVNET_VARIANTS:
        settings = {**CONVNET_DEFAULTS, **CONVNET_VARIANTS[name], **overrides}
        unknown = set(settings) - set(CONVNET_DEFAULTS)
        if unknown:
            raise ValueError(f"{name}: unknown overrides {sorted(unknown)}; valid: {sorted(CONVNET_DEFAULTS)}")
        return ConvNet(channels, num_classes, size, name=name, **settings)
    if name in OTHER_BUILDERS:
        builder, fixed = OTHER_BUILDERS[name]
        try:
            return builder(channels, num_classes, size, **{**fixed, **overrides})
        except TypeError as error:
            raise ValueError(f"{name}: bad overrides {sorted(overrides)}: {error}") from None
    raise AssertionError(f"resolve_model_name returned unregistered {name!r}")
