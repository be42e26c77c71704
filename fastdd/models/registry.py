"""Model names as the references' get_network spells them, and the get_model factory."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .classic import MLP, VGG11, AlexNet, LeNet
from .convnet import ConvNet
from .resnet import ResNet18

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
}

MODELS: tuple[str, ...] = tuple(CONVNET_VARIANTS) + tuple(OTHER_BUILDERS)


def as_image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def get_model(name: str, channels: int, num_classes: int, image_size: int | tuple[int, int],
              **overrides: Any) -> nn.Module:
    """Build model `name` for [N, channels, H, W] inputs. ConvNet names accept overrides
    width, depth, norm, activation, pooling; other models accept their constructor keywords."""
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
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
