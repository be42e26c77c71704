"""Model zoo: ConvNet family, MLP, LeNet, AlexNet, VGG11, ResNet18 and the get_model factory."""
from .classic import MLP, VGG11, AlexNet, LeNet
from .convnet import ACTIVATIONS, NORMS, POOLINGS, ConvBlock, ConvNet
from .registry import MODELS, as_image_size, get_model
from .resnet import ResNet18

__all__ = ["MODELS", "get_model", "as_image_size", "ConvNet", "ConvBlock", "MLP", "LeNet", "AlexNet",
           "VGG11", "ResNet18", "NORMS", "ACTIVATIONS", "POOLINGS"]
