"""Resolves a run's dataset name to (train, test, evaluators): built-in sets, users' files (prepared shards,
image folders, .npz) and builders methods register for derived sets."""
import hashlib
import json
from pathlib import Path
from typing import Callable

from fastdd.data import DATASETS, load_dataset

# name -> builder(config) -> (train, test, extra_metrics list); e.g. rotated-mnist, subpop-mnist.
DATASET_BUILDERS: dict[str, Callable] = {}
DEFAULT_IMAGE_SIZE = 64  # imagefolder: the side length when config key image_size is null
NPZ_TEST_FRACTION = 0.1  # npz without test_images/test_labels: stratified split, seed 0


def register_dataset(name: str):
    def wrap(fn):
        DATASET_BUILDERS[name] = fn
        return fn
    return wrap


def dataset_names() -> list[str]:
    return sorted(set(DATASETS) | set(DATASET_BUILDERS))


def load_run_data(config):
    """(train, test, evaluators) for config.dataset; data_dir points at files a user already has."""
    name = config.dataset
    if name in DATASET_BUILDERS:
        return DATASET_BUILDERS[name](config)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    train = load_dataset(name, split="train", root=config.data_dir, progress=config.progress)
    test = load_dataset(name, split="test", root=config.data_dir, progress=config.progress)
    return train, test, []


def _data_dir(config, what: str) -> Path:
    if not config.data_dir:
        raise ValueError(f"dataset {config.dataset!r} reads {what}: set config key 'data_dir' (--data-dir)")
    path = Path(config.data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"config key 'data_dir' is {config.data_dir!r}, which does not exist")
    return path


@register_dataset("prepared")
def prepared_dataset(config):
    from fastdd.data.shards import load_prepared_splits, read_manifest

    folder = _data_dir(config, "a folder written by `fastdd prepare`")
    size = getattr(config, "image_size", None)
    prepared_size = read_manifest(folder)["size"]
    if size is not None and size != prepared_size:
        raise ValueError(f"config key 'image_size' is {size} but {folder} was prepared at {prepared_size} px; "
                         f"drop image_size or prepare again with --size {size}")
    train, test = load_prepared_splits(folder)
    return train, test, []


def folder_layout(root: Path) -> tuple[Path, Path | None]:
    """(train root, val folder or None): root/train + root/val (ImageNet, ImageNette) or root itself."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    return root, None


def prepared_cache_folder(root: Path, size: int) -> Path:
    """default_cache_dir()/prepared/<name>-<size>px-<hash of the absolute root and size>."""
    from fastdd.data import default_cache_dir
    from fastdd.data.shards import MANIFEST_FORMAT

    key = json.dumps({"root": str(root.resolve()), "size": size, "format": MANIFEST_FORMAT}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir() / "prepared" / f"{root.resolve().name}-{size}px-{digest}"


@register_dataset("imagefolder")
def image_folder_dataset(config):
    from fastdd.data.prepare import prepare
    from fastdd.data.shards import load_prepared_splits

    root = _data_dir(config, "an image folder (root/<class>/<image>, or root/train + root/val)")
    size = getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE
    src, val = folder_layout(root)
    out = prepared_cache_folder(root, size)
    prepare(src, out, size=size, val=val, progress=config.progress)
    train, test = load_prepared_splits(out, name=root.resolve().name)
    return train, test, []


@register_dataset("npz")
def npz_dataset(config):
    """images/labels (+ test_images/test_labels, else a stratified 10% test split, seed 0) from one .npz."""
    from fastdd.data import split_dataset
    from fastdd.data.folders import from_npz_splits

    train, test = from_npz_splits(_data_dir(config, "an .npz file with arrays images and labels"))
    if test is None:
        train, test = split_dataset(train, NPZ_TEST_FRACTION, seed=0)
    return train, test, []
