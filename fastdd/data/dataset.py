"""ImageDataset (uint8 images + labels + normalisation stats), tensor import and stratified splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

IndexLike = Union[Tensor, np.ndarray, Sequence[int], slice]


@dataclass
class ImageDataset:
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "dataset"
    class_names: list[str] = field(default_factory=list)
    domains: Optional[Tensor] = None
    domain_names: Optional[list[str]] = None
    _stats_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"ImageDataset.images must be a uint8 tensor [N, C, H, W], got {_describe(images)}")
        if images.device.type != "cpu":
            raise ValueError(f"ImageDataset.images must live on the CPU, got device {images.device}")
        self.images = images.contiguous()
        n, channels = images.shape[0], images.shape[1]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
            raise ValueError(f"ImageDataset.labels must be an int64 tensor [{n}], got {_describe(labels)}")
        self.labels = labels.cpu().contiguous()
        self.num_classes = int(self.num_classes)
        if self.num_classes < 1:
            raise ValueError(f"ImageDataset.num_classes must be >= 1, got {self.num_classes}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"ImageDataset.labels must lie in [0, {self.num_classes}), "
                f"got range [{int(labels.min())}, {int(labels.max())}]")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        for field_name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != channels:
                raise ValueError(f"ImageDataset.{field_name} needs {channels} values (one per channel), got {values}")
        if min(self.std) <= 0:
            raise ValueError(f"ImageDataset.std must be positive, got {self.std}")
        if not self.class_names:
            self.class_names = [str(c) for c in range(self.num_classes)]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"ImageDataset.class_names has {len(self.class_names)} entries for {self.num_classes} classes")
        self._validate_domains(n)

    def _validate_domains(self, n: int) -> None:
        if self.domains is None:
            if self.domain_names is not None:
                raise ValueError("ImageDataset.domain_names given without ImageDataset.domains")
            return
        domains = self.domains
        if not isinstance(domains, Tensor) or domains.dtype != torch.int64 or tuple(domains.shape) != (n,):
            raise ValueError(f"ImageDataset.domains must be an int64 tensor [{n}], got {_describe(domains)}")
        self.domains = domains.cpu().contiguous()
        num_domains = int(domains.max()) + 1 if n else 0
        if self.domain_names is None:
            self.domain_names = [str(d) for d in range(num_domains)]
        self.domain_names = [str(d) for d in self.domain_names]
        if n and (int(domains.min()) < 0 or num_domains > len(self.domain_names)):
            raise ValueError(
                f"ImageDataset.domains must lie in [0, {len(self.domain_names)}) (one per domain_names entry), "
                f"got range [{int(domains.min())}, {num_domains - 1}]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def _stats(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (str(device), dtype)
        if key not in self._stats_cache:
            shape = (-1, 1, 1)
            mean = torch.tensor(self.mean, dtype=dtype, device=device).view(shape)
            std = torch.tensor(self.std, dtype=dtype, device=device).view(shape)
            self._stats_cache[key] = (mean, std)
        return self._stats_cache[key]

    def normalize(self, images_uint8: Tensor, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """uint8 [..., C, H, W] -> (x/255 - mean)/std, computed on `device` after the (4x smaller) uint8 copy."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
        device = torch.device(device) if device is not None else images_uint8.device
        x = images_uint8.to(device, non_blocking=True).to(dtype).div_(255.0)
        mean, std = self._stats(x.device, dtype)
        return x.sub_(mean).div_(std)

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of normalize, clamped to [0, 1] pixel units."""
        mean, std = self._stats(x.device, x.dtype)
        return (x * std + mean).clamp(0.0, 1.0)

    def subset(self, idx: IndexLike) -> "ImageDataset":
        if isinstance(idx, Tensor):
            idx = idx.cpu()
        elif not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx))
            if idx.dtype != torch.bool:
                idx = idx.long()
        return ImageDataset(
            images=self.images[idx].contiguous(), labels=self.labels[idx].contiguous(),
            num_classes=self.num_classes, mean=self.mean, std=self.std, name=self.name,
            class_names=list(self.class_names),
            domains=None if self.domains is None else self.domains[idx].contiguous(),
            domain_names=None if self.domain_names is None else list(self.domain_names))

    def class_counts(self) -> Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def channel_stats(images_uint8: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units, accumulated in float64 chunks."""
    channels = images_uint8.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images_uint8.shape[0], chunk):
        x = images_uint8[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = max(images_uint8.numel() // max(channels, 1), 1)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _to_uint8_images(images) -> Tensor:
    images = torch.as_tensor(images).cpu()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.contiguous()
    if images.dtype.is_floating_point:
        if images.numel() and (float(images.min()) < -1e-6 or float(images.max()) > 1 + 1e-6):
            raise ValueError(f"float images must lie in [0, 1], got range "
                             f"[{float(images.min()):.4g}, {float(images.max()):.4g}]")
        return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous()
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"images must be uint8, integer 0..255 or float in [0, 1], got {images.dtype}")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) > 255):
        raise ValueError(f"integer images must lie in [0, 255], got range [{int(images.min())}, {int(images.max())}]")
    return images.to(torch.uint8).contiguous()


def _to_index_tensor(values, what: str) -> Tensor:
    values = torch.as_tensor(values).cpu()
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{what} must be integers, got {values.dtype}")
    return values.reshape(-1).to(torch.int64).contiguous()


def from_tensors(images, labels, name: str = "tensors", num_classes: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 domains=None, class_names: Optional[list[str]] = None,
                 domain_names: Optional[list[str]] = None) -> ImageDataset:
    """Wrap in-memory images (uint8 0..255, integer 0..255 or float in [0, 1]; NCHW or NHW) as an ImageDataset."""
    images = _to_uint8_images(images)
    labels = _to_index_tensor(labels, "labels")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    if mean is None or std is None:
        computed_mean, computed_std = channel_stats(images)
        mean = computed_mean if mean is None else mean
        std = computed_std if std is None else std
    return ImageDataset(images=images, labels=labels, num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                        name=name, class_names=list(class_names or []),
                        domains=None if domains is None else _to_index_tensor(domains, "domains"),
                        domain_names=domain_names)


def _stable_keys(n: int, seed: int) -> np.ndarray:
    """splitmix64 hash of (index, seed): a shuffle key that is identical on every numpy/torch version."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed % (1 << 64)) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stratified_test_mask(labels: Tensor, num_classes: int, test_fraction: float, seed: int = 0) -> Tensor:
    """Boolean mask choosing round(test_fraction * class size) pseudo-random samples of every class."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    labels_np = labels.cpu().numpy()
    order = np.lexsort((_stable_keys(len(labels_np), seed), labels_np))
    counts = np.bincount(labels_np, minlength=num_classes)
    class_start = np.cumsum(counts) - counts
    sorted_labels = labels_np[order]
    rank = np.arange(len(labels_np)) - class_start[sorted_labels]
    test_per_class = np.floor(counts * test_fraction + 0.5).astype(np.int64)
    mask = np.zeros(len(labels_np), dtype=bool)
    mask[order] = rank < test_per_class[sorted_labels]
    return torch.from_numpy(mask)


def split_dataset(ds: ImageDataset, test_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic class-stratified split; both parts keep the original sample order."""
    test_mask = stratified_test_mask(ds.labels, ds.num_classes, test_fraction, seed)
    return ds.subset(~test_mask), ds.subset(test_mask)
