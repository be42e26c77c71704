"""The MNIST pool the domain and subpopulation builders share: train + t10k combined when both are present."""
from pathlib import Path

import torch

from .dataset import ImageDataset
from .registry import load_dataset

SPLIT_FILES = (("train", "train-images-idx3-ubyte.gz"), ("test", "t10k-images-idx3-ubyte.gz"))


def mnist_pool(data_dir) -> ImageDataset:
    """MNIST from data_dir: the train and t10k files combined when both are there (DomainBed uses all 70k), else
    the one present; data_dir None loads (or downloads) both."""
    root = Path(data_dir) if data_dir else None
    splits = [split for split, name in SPLIT_FILES if root is None or (root / name).exists()]
    if not splits:
        raise FileNotFoundError(f"no MNIST files (train-*/t10k-*-idx?-ubyte.gz) under --data-dir {data_dir}")
    parts = [load_dataset("mnist", split=split, root=data_dir) for split in splits]
    if len(parts) == 1:
        return parts[0]
    return ImageDataset(images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts]),
                        num_classes=10, mean=parts[0].mean, std=parts[0].std, name="mnist",
                        class_names=parts[0].class_names)
