"""Users' own data: .npz arrays, root/class/image folders and root/domain/class/image folders (PACS layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .dataset import ImageDataset, from_tensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
SizeLike = Union[int, tuple[int, int], None]


def from_npz(path, name: Optional[str] = None) -> ImageDataset:
    """Arrays `images` (NHWC or NCHW, uint8 or float in [0, 1]), `labels`, optional `domains`,
    `class_names`, `domain_names` from an .npz file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from error
    for key in ("images", "labels"):
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r} (found: {sorted(arrays)})")
    images = arrays["images"]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    try:
        return from_tensors(
            np.ascontiguousarray(images), arrays["labels"], name=name or path.stem, domains=arrays.get("domains"),
            class_names=[str(c) for c in arrays["class_names"]] if "class_names" in arrays else None,
            domain_names=[str(d) for d in arrays["domain_names"]] if "domain_names" in arrays else None)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _target_size(image_size: SizeLike) -> Optional[tuple[int, int]]:
    if image_size is None:
        return None
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return int(height), int(width)


def _read_images(paths: list[Path], image_size: SizeLike) -> torch.Tensor:
    """uint8 [N, C, H, W]; all grayscale -> C=1, otherwise everything as RGB (C=3)."""
    from PIL import Image, UnidentifiedImageError

    size = _target_size(image_size)
    arrays, gray = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                is_gray = image.mode in GRAY_MODES
                image = image.convert("L" if is_gray else "RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
        if arrays and array.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"image {path} is {array.shape[1]}x{array.shape[0]} but {paths[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass image_size to resize")
        arrays.append(array)
        gray.append(is_gray)
    if all(gray):
        stacked = np.stack(arrays)[:, None]
    else:
        stacked = np.stack([np.repeat(a[..., None], 3, axis=2) if g else a for a, g in zip(arrays, gray)])
        stacked = stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def _require_folder(root) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return root


def image_folder(root, image_size: SizeLike = None, name: Optional[str] = None) -> ImageDataset:
    """root/<class>/<image>: classes are the sorted sub-folder names."""
    root = _require_folder(root)
    classes = _subfolders(root)
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels = [], []
    for label, class_dir in enumerate(classes):
        files = _image_files(class_dir)
        paths += files
        labels += [label] * len(files)
    return from_tensors(_read_images(paths, image_size), labels, name=name or root.name,
                        num_classes=len(classes), class_names=[c.name for c in classes])


def domain_folder(root, image_size: SizeLike = None, name: Optional[str] = None) -> ImageDataset:
    """root/<domain>/<class>/<image> (PACS, Office-Home, VLCS): classes are the union over domains."""
    root = _require_folder(root)
    domain_dirs = _subfolders(root)
    if not domain_dirs:
        raise ValueError(f"{root} has no domain sub-folders (expected root/<domain>/<class>/<image>)")
    class_dirs_per_domain = [_subfolders(d) for d in domain_dirs]
    for domain_dir, class_dirs in zip(domain_dirs, class_dirs_per_domain):
        if not class_dirs:
            raise ValueError(f"domain folder {domain_dir} has no class sub-folders")
    class_names = sorted({c.name for class_dirs in class_dirs_per_domain for c in class_dirs})
    class_index = {c: i for i, c in enumerate(class_names)}
    paths, labels, domains = [], [], []
    for domain, class_dirs in enumerate(class_dirs_per_domain):
        for class_dir in class_dirs:
            files = _image_files(class_dir)
            paths += files
            labels += [class_index[class_dir.name]] * len(files)
            domains += [domain] * len(files)
    return from_tensors(_read_images(paths, image_size), labels, name=name or root.name,
                        num_classes=len(class_names), class_names=class_names, domains=domains,
                        domain_names=[d.name for d in domain_dirs])
