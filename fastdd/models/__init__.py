"""Model zoo: ConvNet family, MLP, LeNet, AlexNet, VGG11, ResNet18, ResNetAP10 and the get_model factory."""
from .classic import MLP, VGG11, AlexNet, LeNet
from .convnet import ACTIVATIONS, NORMS, POOLINGS, ConvBlock, ConvNet
from .registry import (AUTO_DEPTH_BY_RESOLUTION, AUTO_MODEL, CONCRETE_MODELS, MODELS, as_image_size, get_model,
                       resolve_model_name, uses_batchnorm)
from .resnet import ResNet18, ResNetAP10

__all__ = ["MODELS", "CONCRETE_MODELS", "AUTO_MODEL", "AUTO_DEPTH_BY_RESOLUTION", "get_model",
           "resolve_model_name", "as_image_size", "ResNetAP10", "ConvNet", "ConvBlock", "MLP", "LeNet", "AlexNet",
           "VGG11", "ResNet18", "NORMS", "ACTIVATIONS", "POOLINGS", "uses_batchnorm"]
