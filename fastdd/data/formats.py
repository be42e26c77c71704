"""Parsers for the original dataset files: IDX gz (MNIST family), CIFAR python tar.gz, SVHN .mat."""
from __future__ import annotations

import gzip
import importlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, ValueError)


def read_idx_gz(path: Path, expected_magic: int) -> np.ndarray:
    """uint8 array from a gzipped IDX file (magic 2051: images [N, H, W]; 2049: labels [N])."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except ARCHIVE_ERRORS as error:
        raise RuntimeError(f"{path} is not a readable gzip file: {error}") from error
    if len(raw) < 8:
        raise RuntimeError(f"{path} is too short for an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise RuntimeError(f"{path} has IDX magic {magic}, expected {expected_magic}")
    ndim = raw[3]
    header_bytes = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_bytes + int(np.prod(shape)):
        raise RuntimeError(f"{path} holds {len(raw) - header_bytes} data bytes, its IDX header says shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a tampered archive cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        try:
            return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
        except ImportError:
            return getattr(importlib.import_module(module), name)


def _parse_cifar_batch(raw: bytes, source: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, AttributeError) as error:
        raise RuntimeError(f"{source} is not a CIFAR python batch ({type(error).__name__}: {error})") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise RuntimeError(f"{source}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar_tar(path: Path, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels from the named batches inside an official CIFAR tar.gz."""
    wanted = set(members)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name in wanted:
                    found[member.name] = archive.extractfile(member).read()
    except ARCHIVE_ERRORS as error:
        raise RuntimeError(f"{path} is not a readable tar.gz archive: {error}") from error
    missing = [m for m in members if m not in found]
    if missing:
        raise RuntimeError(f"{path} lacks the CIFAR batch(es) {missing}")
    return _concat([_parse_cifar_batch(found[m], f"{path}:{m}", label_key) for m in members])


def read_cifar_folder(folder: Path, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Same as read_cifar_tar for an already extracted archive (members relative to `folder`)."""
    return _concat([_parse_cifar_batch((folder / m).read_bytes(), str(folder / m), label_key) for m in members])


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels 0..9 from an SVHN *_32x32.mat (label 10 is digit 0)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        images, labels = mat["X"], mat["y"]
    except Exception as error:  # scipy raises assorted types (MatReadError, ValueError, TypeError, OSError)
        raise RuntimeError(f"{path} is not a readable SVHN .mat file ({type(error).__name__}: {error})") from error
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise RuntimeError(f"{path}: expected X [32, 32, 3, N] and N labels, got {images.shape} and {labels.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1), dtype=np.uint8), labels
