"""Opens a folder written by `fastdd prepare` as ImageDatasets whose images are a memory map of the shard file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .download import file_digest

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastdd-prepared-v1"
SPLITS = ("train", "test")


def read_manifest(folder) -> dict:
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared folder: no {MANIFEST} (run `fastdd prepare SRC {folder}`)")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a fastdd prepared manifest (format {MANIFEST_FORMAT})")
    return manifest


def _open_split(folder: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images memmap, labels, split entry), checked against the manifest (shape, dtype, counts)."""
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise ValueError(f"{folder / MANIFEST} has no {split!r} split (splits: {sorted(manifest.get('splits', {}))})")
    images_path, labels_path = folder / entry["images"], folder / entry["labels"]
    expected = (entry["count"], manifest["channels"], manifest["size"], manifest["size"])
    try:
        # Copy-on-write map: pages are read from the file on first touch and never copied unless written,
        # and a stray in-place write changes this process's view instead of crashing on a read-only page.
        images = np.load(images_path, mmap_mode="c", allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{split} shard of {folder} is unreadable ({error}); prepare it again with --force") from error
    if images.dtype != np.uint8 or images.shape != expected:
        raise ValueError(f"{images_path} holds {images.dtype} {images.shape}, its manifest says uint8 {expected}; "
                         f"prepare it again with --force")
    if labels.dtype != np.int64 or labels.shape != (entry["count"],):
        raise ValueError(f"{labels_path} holds {labels.dtype} {labels.shape}, its manifest says int64 "
                         f"({entry['count']},); prepare it again with --force")
    num_classes = len(manifest["classes"])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{labels_path} has labels outside [0, {num_classes}); prepare it again with --force")
    if np.bincount(labels, minlength=num_classes).tolist() != entry["class_counts"]:
        raise ValueError(f"{labels_path} class counts differ from its manifest's class_counts; "
                         f"prepare it again with --force")
    return images, labels, entry


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (what `sha256sum` prints)."""
    return file_digest(path, "sha256")


def _verify(folder: Path, split: str, entry: dict) -> None:
    for what, key in (("images", "sha256_images"), ("labels", "sha256_labels")):
        if file_sha256(folder / entry[what]) != entry[key]:
            raise ValueError(f"{folder / entry[what]}: sha256 of the {split} {what} file differs from the manifest "
                             f"(the file changed or is damaged); prepare it again with --force")


def check_prepared(folder, verify: bool = False) -> dict:
    """The manifest of `folder` after checking every split's files against it (sha256 too if `verify`)."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    for split in manifest.get("splits", {}):
        images, labels, entry = _open_split(folder, manifest, split)
        if verify:
            _verify(folder, split, entry)
    return manifest


def load_prepared(folder, split: str = "train", verify: bool = False, name: Optional[str] = None):
    """ImageDataset of one split; `images` is a torch view of the shard's memory map (never read whole)."""
    import torch

    from .dataset import ImageDataset

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    images, labels, entry = _open_split(folder, manifest, split)
    if verify:
        _verify(folder, split, entry)
    return ImageDataset(images=torch.from_numpy(images), labels=torch.from_numpy(labels),
                        num_classes=len(manifest["classes"]), mean=tuple(manifest["mean"]),
                        std=tuple(manifest["std"]), name=name or folder.name,
                        class_names=list(manifest["class_names"]))


def load_prepared_splits(folder, verify: bool = False, name: Optional[str] = None):
    """(train, test) ImageDatasets of a prepared folder."""
    return tuple(load_prepared(folder, split, verify, name) for split in SPLITS)
