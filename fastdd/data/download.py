"""Cache folder, md5 verification and atomic streamed downloads of dataset files."""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A dataset file could not be fetched or failed its checksum; the message says what to do."""

TEMP_SUFFIX = ".part"


def default_cache_dir() -> Path:
    """$FASTDD_DATA if set, else ~/.cache/fastdd."""
    configured = os.environ.get("FASTDD_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fastdd"


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a whole file (what `md5sum` / `sha256sum` print), read in CHUNK_BYTES blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def _checksum_error(path: Path, expected: str, actual: str, removed: bool) -> DownloadError:
    action = "removed it; run again to download a fresh copy" if removed else "delete or replace it"
    return DownloadError(f"checksum mismatch for {path}: expected md5 {expected}, got {actual} ({action})")


def verify_existing(path: Path, md5: Optional[str], remove_if_bad: bool) -> None:
    """Re-check a file already on disk; a bad one is reported (and removed from a cache) rather than parsed."""
    if md5 is None:
        return
    actual = file_md5(path)
    if actual != md5:
        if remove_if_bad:
            path.unlink(missing_ok=True)
        raise _checksum_error(path, md5, actual, removed=remove_if_bad)


def download_file(url: str, destination: Path, md5: Optional[str], progress: bool = True,
                  timeout_s: float = 60.0) -> Path:
    """Stream `url` into a temp file beside `destination`, verify md5, then os.replace it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=TEMP_SUFFIX, dir=destination.parent)
    temp_path = Path(temp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=destination.name, disable=not progress, leave=False) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if md5 is not None and actual != md5:
            raise DownloadError(f"checksum mismatch for {destination.name} downloaded from {url}: "
                               f"expected md5 {md5}, got {actual} (the download was discarded)")
        os.replace(temp_path, destination)
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, truncated bodies
        if isinstance(error, DownloadError):
            raise
        raise DownloadError(f"could not download {url}: {error}. Fetch the file by other means and put it at "
                           f"{destination} (or pass that folder as root / --data-dir)") from error
    finally:
        temp_path.unlink(missing_ok=True)
    return destination


def ensure_file(folder: Path, filename: str, md5: Optional[str], url: str, download: bool,
                progress: bool, remove_if_bad: bool) -> Path:
    """Path of a verified `folder/filename`, downloading it from `url` when missing and allowed."""
    path = folder / filename
    if path.is_file():
        verify_existing(path, md5, remove_if_bad)
        return path
    if not download:
        raise FileNotFoundError(f"{filename} not found: looked for {path}. Download it from {url} into {folder}, "
                                f"or allow downloading (download=True / omit --no-download)")
    return download_file(url, path, md5, progress)
