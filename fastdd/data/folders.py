"""Users' own data: .npz arrays, root/class/image folders, root/domain/class/image folders (PACS layout), and
the class / validation-folder scans `fastdd prepare` uses."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .dataset import ImageDataset, from_tensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
SizeLike = Union[int, tuple[int, int], None]


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from error


def _npz_dataset(path: Path, arrays: dict, prefix: str, name: str, **stats) -> ImageDataset:
    for key in (f"{prefix}images", f"{prefix}labels"):
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r} (found: {sorted(arrays)})")
    images = arrays[f"{prefix}images"]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    try:
        return from_tensors(
            np.ascontiguousarray(images), arrays[f"{prefix}labels"], name=name,
            domains=arrays.get(f"{prefix}domains"),
            class_names=[str(c) for c in arrays["class_names"]] if "class_names" in arrays else None,
            domain_names=[str(d) for d in arrays["domain_names"]] if "domain_names" in arrays else None, **stats)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def from_npz(path, name: Optional[str] = None) -> ImageDataset:
    """Arrays `images` (NHWC or NCHW, uint8 or float in [0, 1]), `labels`, optional `domains`,
    `class_names`, `domain_names` from an .npz file."""
    path = Path(path)
    return _npz_dataset(path, _load_npz(path), "", name or path.stem)


def from_npz_splits(path, name: Optional[str] = None) -> tuple[ImageDataset, Optional[ImageDataset]]:
    """(train, test) from one .npz: `images`/`labels` and, when present, `test_images`/`test_labels`
    (normalised with the train statistics); test is None without them."""
    path = Path(path)
    arrays = _load_npz(path)
    train = _npz_dataset(path, arrays, "", name or path.stem)
    if "test_images" not in arrays and "test_labels" not in arrays:
        return train, None
    test = _npz_dataset(path, arrays, "test_", name or path.stem, mean=train.mean, std=train.std,
                        num_classes=train.num_classes)
    return train, test


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


VAL_LABEL_FILES = ("LOC_val_solution.csv",)


def _requested_classes(classes) -> Optional[list[str]]:
    """A list of class folder names from a list, a comma-separated string, or a file (one per line)."""
    if classes is None:
        return None
    if isinstance(classes, (str, Path)):
        if Path(classes).expanduser().is_file():
            lines = Path(classes).expanduser().read_text().splitlines()
            wanted = [line.split("#")[0].strip() for line in lines]
        else:
            wanted = str(classes).split(",")
    else:
        wanted = [str(c) for c in classes]
    wanted = [c.strip() for c in wanted if c.strip()]
    if not wanted:
        raise ValueError(f"classes names no class: {classes!r}")
    duplicates = sorted({c for c in wanted if wanted.count(c) > 1})
    if duplicates:
        raise ValueError(f"classes lists {duplicates} more than once")
    return wanted


def scan_classes(root, classes=None, subset: Optional[str] = None) -> tuple[list[Path], list[str]]:
    """Class folders of root/<class>/<image> in label order (sorted, or the requested list's order) and their
    human-readable names (from the built-in subset lists where known, else the folder names)."""
    from .subsets import SUBSETS, get_subset

    root = _require_folder(root)
    if classes is not None and subset is not None:
        raise ValueError("give either a class subset or a class list, not both")
    if not _subfolders(root):
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    chosen = get_subset(subset) if subset is not None else None
    wanted = list(chosen.wnids) if chosen is not None else _requested_classes(classes)
    if wanted is None:
        class_dirs = _subfolders(root)
    else:
        missing = [c for c in wanted if not (root / c).is_dir()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            what = f"subset {subset!r}" if chosen is not None else "the requested classes"
            raise ValueError(f"{root} lacks the class folder(s) {shown} of {what}")
        class_dirs = [root / c for c in wanted]
    known = {w: n for s in SUBSETS.values() if s.names for w, n in zip(s.wnids, s.names)}
    return class_dirs, [known.get(d.name, d.name) for d in class_dirs]


def _find_val_labels(val: Path) -> Optional[Path]:
    for folder in [val, *list(val.parents)[:4]]:
        for name in VAL_LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def scan_val(val, class_names: Sequence[str], val_labels=None) -> tuple[list[str], "np.ndarray"]:
    """Validation files and labels: val/<class>/<image>, or flat val/<image> labelled by a CSV whose rows are
    `image id, label ...` (ImageNet's LOC_val_solution.csv: the first word of PredictionString is the wnid)."""
    val = _require_folder(val)
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    if _subfolders(val):
        for name in class_names:
            if not (val / name).is_dir():
                raise ValueError(f"validation folder {val} has no folder for class {name!r}")
            files = _image_files(val / name)
            paths += [str(p) for p in files]
            labels += [index[name]] * len(files)
        return paths, np.asarray(labels, dtype=np.int64)
    label_file = Path(val_labels).expanduser() if val_labels is not None else _find_val_labels(val)
    if label_file is None:
        raise ValueError(f"validation folder {val} has no class sub-folders and no labels file "
                         f"(pass --val-labels, e.g. ImageNet's LOC_val_solution.csv)")
    files = {p.stem: p for p in val.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    try:
        with open(label_file, newline="") as handle:
            rows = [row for row in csv.reader(handle) if len(row) >= 2]
    except OSError as error:
        raise ValueError(f"cannot read validation labels {label_file}: {error}") from error
    for image_id, label_text, *_ in sorted(rows):
        words = label_text.split()
        if not words or words[0] not in index:
            continue
        stem = Path(image_id).stem
        if stem not in files:
            raise ValueError(f"validation labels {label_file} name {image_id!r}, which is not an image in {val}")
        paths.append(str(files[stem]))
        labels.append(index[words[0]])
    labels = np.asarray(labels, dtype=np.int64)
    empty = [name for i, name in enumerate(class_names) if not (labels == i).any()]
    if empty:
        raise ValueError(f"validation labels {label_file} give no image in {val} for class(es) {empty[:5]}")
    return paths, labels
