"""Feature-shape probing for models whose trunk size depends on the input image size."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def probe_feature_dim(model_name: str, module: nn.Module, trunk: Callable[[torch.Tensor], torch.Tensor],
                      channels: int, image_size: tuple[int, int]) -> int:
    """Flattened per-image size of `trunk(x)`; ValueError if the image is too small."""
    height, width = image_size
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            features = trunk(torch.zeros(2, channels, height, width))
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"{model_name} cannot take {channels}x{height}x{width} images (too small): {error}") from None
    finally:
        module.train(was_training)
    if features.numel() == 0:
        raise ValueError(f"{model_name} cannot take {channels}x{height}x{width} images (too small)")
    return features[0].numel()
