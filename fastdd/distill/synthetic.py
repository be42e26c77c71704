"""The synthetic set: learnable normalised images (class-major), labels, initialisation and save/load."""
from dataclasses import dataclass

import torch

from fastdd.data import ClassSampler, ImageDataset


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float [C*ipc, ch, H, W], requires_grad, normalised like the dataset
    labels: torch.Tensor  # int64 [C*ipc], class-major
    num_classes: int
    ipc: int

    @classmethod
    def initialise(cls, train: ImageDataset, ipc: int, init: str, generator: torch.Generator,
                   device: torch.device) -> "SyntheticSet":
        C = train.num_classes
        labels = torch.arange(C).repeat_interleave(ipc)
        if init == "real":
            idx = ClassSampler(train.labels, C).take(ipc, generator=generator).reshape(-1)
            images = train.normalize(train.images[idx], device=device)
        else:
            shape = (C * ipc, train.channels, *train.image_size)
            images = torch.randn(shape, generator=generator).to(device)
        return cls(images.detach().clone().requires_grad_(True), labels.to(device), C, ipc)

    @property
    def seg(self) -> torch.Tensor:
        return self.labels

    def detached(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.detach().cpu().clone(), self.labels.cpu().clone()
