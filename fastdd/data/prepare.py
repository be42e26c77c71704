"""`fastdd prepare`: decode root/class/image trees in a process pool into memory-mappable uint8 shards."""
from __future__ import annotations

import concurrent.futures
import datetime
import functools
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .folders import _image_files, scan_classes, scan_val
from .shards import MANIFEST, MANIFEST_FORMAT, check_prepared, file_sha256

# torchvision's Resize(size) + CenterCrop(size) on PIL images (the DC/DM/IDC references' ImageNet
# pipeline): shorter side to `size` with the longer side truncated, PIL bilinear (antialiased when
# shrinking), then a centre crop whose offsets round half to even like torchvision's int(round(...)).
RESIZE_FILTER = "PIL.Image.BILINEAR"
MODES = {"RGB": 3, "L": 1}
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, MemoryError)
ClassesLike = Union[None, str, Sequence[str]]


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `size` (torchvision Resize(int) semantics)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def decode_one(path, size: int, mode: str = "RGB") -> np.ndarray:
    """uint8 [C, size, size]: convert to `mode`, resize the shorter side to `size`, centre-crop."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert(mode)
    width, height = image.size
    new_width, new_height = resized_size(width, height, size)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1) if array.ndim == 3 else array[None])


def _decode_task(path: str, size: int, mode: str):
    """(image, per-channel sums, per-channel sums of squares) or the reason the file cannot be read."""
    from PIL import Image

    try:
        image = decode_one(path, size, mode)
    except (*DECODE_ERRORS, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    flat = image.reshape(image.shape[0], -1)
    squares = flat.astype(np.uint32) ** 2
    return image, flat.sum(axis=1, dtype=np.uint64), squares.sum(axis=1, dtype=np.uint64)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down


def _pool(workers: int) -> Optional[concurrent.futures.ProcessPoolExecutor]:
    if workers == 1:
        return None
    methods = multiprocessing.get_all_start_methods()
    # fork: workers need only PIL/numpy, and start without re-importing torch (spawn costs seconds each).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" and "fork" in methods else "spawn")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)


def _decoded(pool, paths: list[str], size: int, mode: str, workers: int) -> Iterable:
    task = functools.partial(_decode_task, size=size, mode=mode)
    if pool is None:
        return map(task, paths)
    # small chunks: Ctrl-C waits only for the few chunks already handed to workers
    return pool.map(task, paths, chunksize=max(1, min(16, len(paths) // (8 * workers))))


def _write_split(folder: Path, split: str, paths: list[str], labels: np.ndarray, num_classes: int, size: int,
                 mode: str, pool, workers: int, strict: bool, progress: bool) -> tuple[dict, list[dict], tuple]:
    """Decode `paths` in order into folder/<split>_images.npy; skipped files leave no row."""
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    channels = MODES[mode]
    shape = (len(paths), channels, size, size)
    images_file = folder / f"{split}_images.npy"
    images = open_memmap(images_file, mode="w+", dtype=np.uint8, shape=shape)
    sums = np.zeros(channels, dtype=np.uint64)
    sums_sq = np.zeros(channels, dtype=np.uint64)
    kept, skipped = [], []
    with tqdm(total=len(paths), unit="img", desc=f"prepare {split}", disable=not progress, leave=False) as bar:
        for index, result in enumerate(_decoded(pool, paths, size, mode, workers)):
            bar.update(1)
            if isinstance(result, str):
                if strict:
                    raise ValueError(f"cannot read image {paths[index]}: {result} (strict: nothing was written)")
                skipped.append({"path": paths[index], "split": split, "reason": result})
                continue
            image, image_sums, image_sums_sq = result
            images[len(kept)] = image
            sums += image_sums
            sums_sq += image_sums_sq
            kept.append(index)
    images.flush()
    del images
    if not kept:
        raise ValueError(f"no image of the {split} split could be read (first: {skipped[0]['path']}: "
                         f"{skipped[0]['reason']})" if skipped else f"the {split} split has no images")
    if len(kept) < len(paths):
        _shrink(images_file, len(kept))
    kept_labels = np.ascontiguousarray(labels[kept], dtype=np.int64)
    np.save(folder / f"{split}_labels.npy", kept_labels)
    entry = {"images": images_file.name, "labels": f"{split}_labels.npy", "count": len(kept),
             "class_counts": np.bincount(kept_labels, minlength=num_classes).tolist(),
             "sha256_images": file_sha256(images_file), "sha256_labels": file_sha256(folder / f"{split}_labels.npy")}
    return entry, skipped, (sums, sums_sq, len(kept) * size * size)


def _shrink(images_file: Path, rows: int, chunk: int = 4096) -> None:
    """Rewrite an .npy keeping its first `rows` rows (the header records the shape, so a new file)."""
    from numpy.lib.format import open_memmap

    source = np.load(images_file, mmap_mode="r")
    shrunk_file = images_file.with_name(images_file.name + ".shrink")
    target = open_memmap(shrunk_file, mode="w+", dtype=np.uint8, shape=(rows, *source.shape[1:]))
    for start in range(0, rows, chunk):
        target[start:start + chunk] = source[start:min(start + chunk, rows)]
    target.flush()
    del target, source
    os.replace(shrunk_file, images_file)


def channel_moments(sums: np.ndarray, sums_sq: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std in [0, 1] units from exact integer pixel sums."""
    mean = sums.astype(np.float64) / (255.0 * pixels)
    variance = sums_sq.astype(np.float64) / (255.0 ** 2 * pixels) - mean ** 2
    return mean.tolist(), np.maximum(np.sqrt(np.maximum(variance, 0.0)), 1e-6).tolist()


def stratified_split(labels: np.ndarray, num_classes: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: round(test_fraction * class size) pseudo-random files of every class."""
    import torch

    from .dataset import stratified_test_mask

    return stratified_test_mask(torch.from_numpy(labels), num_classes, test_fraction, seed).numpy()


def _check_arguments(size, workers, test_fraction, val, mode) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if val is not None and test_fraction is not None:
        raise ValueError("give either val (a validation folder) or test_fraction (a stratified split), not both")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")


def prepare(src, out, size: int = 64, classes: ClassesLike = None, subset: Optional[str] = None,
            workers: Optional[int] = None, strict: bool = False, val=None, val_labels=None,
            test_fraction: Optional[float] = None, seed: int = 0, mode: str = "RGB", force: bool = False,
            progress: bool = True) -> dict:
    """Prepare `src` (root/<class>/<image>) into `out`: {train,test}_{images,labels}.npy + manifest.json.

    The test split is `val` (class sub-folders, or flat files with a LOC_val_solution.csv-style `val_labels`)
    or, without `val`, a stratified `test_fraction` (default 0.1) of `src` chosen by `seed`. Rerunning with
    the same arguments is a no-op; other arguments on an existing `out` need `force`. Returns the manifest
    (plus `reused`: whether `out` already held it)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_arguments(size, workers, test_fraction, val, mode)
    if val is None and test_fraction is None:
        test_fraction = 0.1
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    class_dirs, class_names = scan_classes(src, classes, subset)
    arguments = {"source": str(src), "size": size, "mode": mode, "filter": RESIZE_FILTER,
                 "classes": [d.name for d in class_dirs], "subset": subset,
                 "val": None if val is None else str(Path(val).expanduser().resolve()),
                 "val_labels": None if val_labels is None else str(Path(val_labels).expanduser().resolve()),
                 "test_fraction": test_fraction, "seed": seed if val is None else None}
    existing = _existing_manifest(out)
    if existing is not None and existing.get("arguments") == arguments:
        try:
            check_prepared(out)
        except ValueError:
            if not force:
                raise  # its message asks for --force, which rebuilds it below
        else:
            if progress:
                print(f"fastdd: {out} is already prepared with these arguments; nothing to do", flush=True)
            return {**existing, "reused": True}
    if existing is not None and not force:
        raise ValueError(f"{out} holds a prepared set made with other arguments; pass --force (force=True) "
                         f"to replace it, or choose another OUT")
    if out.exists() and existing is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a fastdd prepared folder; choose another OUT")
    splits = _split_paths(src, class_dirs, val, val_labels, test_fraction, seed)
    _remove_stale_temps(out)
    temp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    manifest = None
    try:
        temp.mkdir(parents=True)
        manifest = _write(temp, arguments, splits, class_dirs, class_names, size, mode, workers, strict, progress)
        _move_into_place(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # on success the rename already moved it; on any error: gone
    return {**manifest, "reused": False}


def _remove_stale_temps(out: Path) -> None:
    """Temp folders of earlier runs on `out` whose process is gone (killed with SIGKILL, power loss)."""
    for stale in out.parent.glob(f"{out.name}.tmp-*") if out.parent.is_dir() else []:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _existing_manifest(out: Path) -> Optional[dict]:
    try:
        with open(out / MANIFEST) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _split_paths(src, class_dirs, val, val_labels, test_fraction, seed) -> dict[str, tuple[list[str], np.ndarray]]:
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    labels = np.asarray(labels, dtype=np.int64)
    if val is not None:
        val_paths, val_labels_array = scan_val(Path(val).expanduser(), [d.name for d in class_dirs], val_labels)
        return {"train": (paths, labels), "test": (val_paths, val_labels_array)}
    test_mask = stratified_split(labels, len(class_dirs), test_fraction, seed)
    pick = lambda mask: ([p for p, m in zip(paths, mask) if m], labels[mask])  # noqa: E731
    return {"train": pick(~test_mask), "test": pick(test_mask)}


def _write(folder: Path, arguments: dict, splits: dict, class_dirs, class_names, size, mode, workers, strict,
           progress) -> dict:
    from fastdd import __version__

    entries, skipped, moments = {}, [], None
    pool = _pool(workers)
    try:
        for split, (paths, labels) in splits.items():
            entries[split], split_skipped, split_moments = _write_split(
                folder, split, paths, labels, len(class_dirs), size, mode, pool, workers, strict, progress)
            skipped += split_skipped
            moments = split_moments if split == "train" else moments
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    mean, std = channel_moments(*moments)
    manifest = {
        "format": MANIFEST_FORMAT, "fastdd_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": arguments["source"], "arguments": arguments, "size": size, "channels": MODES[mode], "mode": mode,
        "resize": f"shorter side to {size} (longer side truncated), {RESIZE_FILTER}, centre crop {size}x{size}",
        "filter": RESIZE_FILTER, "classes": [d.name for d in class_dirs], "class_names": class_names,
        "mean": mean, "std": std, "stats_split": "train",
        "test_split": "val folder" if arguments["val"] else f"stratified test_fraction {arguments['test_fraction']}",
        "splits": entries, "skipped": skipped}
    with open(folder / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _move_into_place(temp: Path, out: Path) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(temp, out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(temp, out)
    except BaseException:
        os.replace(old, out)  # put the previous set back rather than leave no OUT
        raise
    shutil.rmtree(old, ignore_errors=True)
