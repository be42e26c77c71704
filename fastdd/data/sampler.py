"""ClassSampler: random distinct per-class indices for every class in one vectorised sort."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class ClassSampler:
    """Draws up to n random distinct indices of every class at once (the reference's per-class permutation[:n]).

    Works on the device of `labels`; a `generator` passed to sample/take must live on that device.
    """

    def __init__(self, labels: Tensor, num_classes: int) -> None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        self.num_classes = int(num_classes)
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        self.labels = labels.contiguous()
        self.class_sizes = torch.bincount(self.labels, minlength=self.num_classes)
        self._by_class = torch.argsort(self.labels, stable=True)
        sorted_labels = self.labels[self._by_class]
        self._class_keys = sorted_labels << 32
        class_start = torch.cumsum(self.class_sizes, 0) - self.class_sizes
        self._class_start_sorted = class_start[sorted_labels]
        self._positions = torch.arange(self.labels.numel(), device=self.labels.device)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def sample(self, n_per_class: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Up to n random distinct indices per class -> (idx [M], seg [M]); grouped by class ascending."""
        n_per_class = _check_count(n_per_class)
        # (class << 32) + random 31-bit key: one integer sort groups by class and shuffles inside each class;
        # indices stay distinct even on key ties because argsort returns a permutation.
        keys = torch.randint(0, 1 << 31, (self.labels.numel(),), generator=generator,
                             dtype=torch.int64, device=self.labels.device)
        order = torch.argsort(self._class_keys + keys)
        rank_in_class = self._positions - self._class_start_sorted
        keep = rank_in_class < n_per_class
        idx = self._by_class[order[keep]]
        return idx, self.labels[idx]

    def take(self, n_per_class: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Exactly n random distinct indices of every class -> [num_classes, n] (e.g. to initialise synthetic sets)."""
        n_per_class = _check_count(n_per_class)
        too_small = torch.nonzero(self.class_sizes < n_per_class).flatten()
        if too_small.numel():
            c = int(too_small[0])
            raise ValueError(f"IPC larger than a class's size: class {c} has {int(self.class_sizes[c])} samples, "
                             f"{n_per_class} requested ({too_small.numel()} class(es) too small)")
        idx, _ = self.sample(n_per_class, generator)
        return idx.view(self.num_classes, n_per_class)


def _check_count(n_per_class) -> int:
    if isinstance(n_per_class, bool) or int(n_per_class) != n_per_class or n_per_class < 0:
        raise ValueError(f"n_per_class must be a non-negative integer, got {n_per_class!r}")
    return int(n_per_class)
