"""Built-in datasets (digits, MNIST family, CIFAR-10/100, SVHN): sources, checksums, stats and load_dataset."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .dataset import ImageDataset, stratified_test_mask
from .download import default_cache_dir, ensure_file
from .formats import (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_cifar_folder, read_cifar_tar, read_idx_gz,
                      read_svhn_mat)

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn")
SPLITS = ("train", "test")

# sklearn digits: fixed stratified split (seed 0, 20% test); stats measured on its train split.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0
DIGITS_MEAN = (0.30518,)
DIGITS_STD = (0.37609,)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()

Reader = Callable[[list[Path], str], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetSource:
    base_url: str
    files: dict[str, tuple[str, ...]]  # split -> file names, as published
    md5: dict[str, str]  # file name -> official md5
    reader: Reader
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    extracted_folder: Optional[str] = None  # accepted in place of the archive when a user already unpacked it


def _read_idx_pair(paths: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_gz(paths[0], IDX_IMAGES_MAGIC)
    labels = read_idx_gz(paths[1], IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise RuntimeError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    return images[:, None], labels.astype(np.int64)


def _idx_files(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _mnist_like(base_url: str, md5s: tuple[str, str, str, str], mean: float, std: float,
                class_names: list[str]) -> DatasetSource:
    names = _idx_files("train") + _idx_files("t10k")
    return DatasetSource(base_url, {"train": _idx_files("train"), "test": _idx_files("t10k")},
                         dict(zip(names, md5s)), _read_idx_pair, (mean,), (std,), class_names)


CIFAR_MEMBERS = {
    "cifar10": {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
                "test": ["cifar-10-batches-py/test_batch"]},
    "cifar100": {"train": ["cifar-100-python/train"], "test": ["cifar-100-python/test"]},
}


def _cifar_reader(name: str, label_key: bytes) -> Reader:
    def read(paths: list[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
        members = CIFAR_MEMBERS[name][split]
        if paths[0].is_dir():
            return read_cifar_folder(paths[0].parent, members, label_key)
        return read_cifar_tar(paths[0], members, label_key)
    return read


def _cifar(name: str, filename: str, md5: str, label_key: bytes, mean, std, classes) -> DatasetSource:
    return DatasetSource("https://www.cs.toronto.edu/~kriz/", {"train": (filename,), "test": (filename,)},
                         {filename: md5}, _cifar_reader(name, label_key), mean, std, classes,
                         extracted_folder=CIFAR_MEMBERS[name]["train"][0].split("/")[0])


SOURCES: dict[str, DatasetSource] = {
    "mnist": _mnist_like(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        0.1307, 0.3081, [str(d) for d in range(10)]),
    "fashion-mnist": _mnist_like(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
         "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        0.2861, 0.3530,
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "kmnist": _mnist_like(
        "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        ("bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
         "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"),
        0.1918, 0.3483, ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
    "cifar10": _cifar("cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", b"labels",
                      (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), CIFAR10_CLASSES),
    "cifar100": _cifar("cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", b"fine_labels",
                       (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), CIFAR100_CLASSES),
    "svhn": DatasetSource(
        "http://ufldl.stanford.edu/housenumbers/", {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
        lambda paths, split: read_svhn_mat(paths[0]),
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), [str(d) for d in range(10)]),
}


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as uint8 [N, 1, 8, 8] (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


def _load_digits(split: str) -> ImageDataset:
    images, labels = load_digits_uint8()
    labels_t = torch.from_numpy(labels)
    test_mask = stratified_test_mask(labels_t, 10, DIGITS_TEST_FRACTION, DIGITS_SEED)
    keep = test_mask if split == "test" else ~test_mask
    return ImageDataset(images=torch.from_numpy(images)[keep].contiguous(), labels=labels_t[keep].contiguous(),
                        num_classes=10, mean=DIGITS_MEAN, std=DIGITS_STD, name="digits",
                        class_names=[str(d) for d in range(10)])


def _source_paths(source: DatasetSource, split: str, folder: Path, download: bool, base_url: str,
                  progress: bool, md5s: dict[str, Optional[str]], in_cache: bool) -> list[Path]:
    if source.extracted_folder and not (folder / source.files[split][0]).exists() \
            and (folder / source.extracted_folder).is_dir():
        return [folder / source.extracted_folder]
    prefix = base_url if base_url.endswith("/") else base_url + "/"
    return [ensure_file(folder, filename, md5s.get(filename), prefix + filename, download, progress,
                        remove_if_bad=in_cache)
            for filename in source.files[split]]


def _mirror_url(name: str) -> Optional[str]:
    """$FASTDD_MIRROR/<name>/ when a mirror (e.g. an offline cluster's file server) is configured."""
    mirror = os.environ.get("FASTDD_MIRROR")
    return f"{mirror.rstrip('/')}/{name}/" if mirror else None


def load_dataset(name: str, split: str = "train", root=None, download: bool = True, base_url: Optional[str] = None,
                 progress: bool = True, *, checksums: Optional[dict[str, Optional[str]]] = None) -> ImageDataset:
    """Load a built-in dataset split as uint8 images.

    root: a folder holding the original files under their published names (the CLI's --data-dir); default
    default_cache_dir()/<name>. base_url replaces the download prefix (default $FASTDD_MIRROR/<name>/ if set,
    else the publisher's). checksums maps file name -> md5 and
    overrides the official table (None skips verification of that file), e.g. for re-packed or test files.
    """
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {key}; valid splits: {', '.join(SPLITS)}")
    if key == "digits":
        return _load_digits(split)
    source = SOURCES[key]
    folder = Path(root).expanduser() if root is not None else default_cache_dir() / key
    md5s: dict[str, Optional[str]] = {**source.md5, **(checksums or {})}
    url = base_url or _mirror_url(key) or source.base_url
    paths = _source_paths(source, split, folder, download, url, progress, md5s, in_cache=root is None)
    images, labels = source.reader(paths, split)
    return ImageDataset(images=torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)),
                        labels=torch.from_numpy(np.array(labels, dtype=np.int64, copy=True)),
                        num_classes=len(source.class_names), mean=source.mean, std=source.std, name=key,
                        class_names=list(source.class_names))
