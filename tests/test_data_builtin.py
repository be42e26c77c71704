"""Tests for load_dataset on the original file formats: shared MNIST, loopback downloads, CIFAR/SVHN, corruption."""
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdd.data import default_cache_dir, load_dataset

SHARED = Path(os.environ.get("FASTDD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
MNIST_T10K = SHARED / "data" / "mnist-t10k"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
needs_mnist = pytest.mark.skipif(not all((MNIST_T10K / f).is_file() for f in MNIST_FILES),
                                 reason=f"shared MNIST t10k files not found in {MNIST_T10K} (set FASTDD_SHARED)")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """serve(folder) -> base URL of a loopback HTTP server publishing that folder."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


@needs_mnist
def test_mnist_t10k_from_shared_files():
    ds = load_dataset("mnist", split="test", root=MNIST_T10K, download=False)
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.class_counts().tolist() == MNIST_TEST_COUNTS
    assert ds.mean == (0.1307,) and ds.std == (0.3081,) and ds.name == "mnist"
    assert int(ds.images.max()) == 255 and ds.labels[:5].tolist() == [7, 2, 1, 0, 4]


@needs_mnist
def test_download_verifies_and_parses(tmp_path, serve):
    url = serve(MNIST_T10K)
    ds = load_dataset("mnist", split="test", root=tmp_path, base_url=url, progress=False)
    assert ds.class_counts().tolist() == MNIST_TEST_COUNTS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(MNIST_FILES)
    assert md5_of(tmp_path / MNIST_FILES[0]) == "9fb629c4189551a2d022fa330f9573f3"
    again = load_dataset("mnist", split="test", root=tmp_path, download=False)
    assert torch.equal(again.images, ds.images)


def test_download_with_wrong_content_leaves_nothing(tmp_path, serve):
    served = tmp_path / "server"
    served.mkdir()
    for name in MNIST_FILES:
        (served / name).write_bytes(b"not the real file")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as info:
        load_dataset("mnist", split="test", root=cache, base_url=serve(served), progress=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "9fb629c4189551a2d022fa330f9573f3" in message
    assert hashlib.md5(b"not the real file").hexdigest() in message
    assert list(cache.iterdir()) == []


def test_missing_file_on_server_is_reported(tmp_path, serve):
    empty = tmp_path / "server"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="could not download .*t10k-images"):
        load_dataset("mnist", split="test", root=tmp_path / "cache", base_url=serve(empty), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_download_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", split="train", root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in message


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FASTDD_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "fastdd"


def test_bad_file_in_cache_is_removed_not_parsed(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path))
    bad = tmp_path / "kmnist" / "t10k-images-idx3-ubyte.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=r"checksum mismatch .*kmnist.*5c965bf0a639b31b8f53240b1b52f4d7"):
        load_dataset("kmnist", split="test", download=False)
    assert not bad.exists()


def test_bad_file_in_user_folder_is_reported_but_kept(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        load_dataset("mnist", split="test", root=tmp_path, download=False)
    assert bad.exists()


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_corrupt_and_mislabelled_idx_files(tmp_path):
    images, labels = tmp_path / MNIST_FILES[0], tmp_path / MNIST_FILES[1]
    skip_md5 = {MNIST_FILES[0]: None, MNIST_FILES[1]: None}
    write_idx(labels, 2049, np.arange(4))
    images.write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(RuntimeError, match="t10k-images-idx3-ubyte.gz.*gzip"):
        load_dataset("mnist", split="test", root=tmp_path, download=False, checksums=skip_md5)
    write_idx(images, 2049, np.arange(4))
    with pytest.raises(RuntimeError, match="t10k-images-idx3-ubyte.gz has IDX magic 2049, expected 2051"):
        load_dataset("mnist", split="test", root=tmp_path, download=False, checksums=skip_md5)
    write_idx(images, 2051, np.full((4, 3, 3), 9))
    ds = load_dataset("mnist", split="test", root=tmp_path, download=False, checksums=skip_md5)
    assert ds.images.shape == (4, 1, 3, 3) and ds.labels.tolist() == [0, 1, 2, 3]


def cifar_batch(rng, n, label_keys):
    batch = {b"batch_label": b"synthetic", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    for key, classes in label_keys.items():
        batch[key] = rng.integers(0, classes, n).tolist()
    return batch


def write_tar_gz(path: Path, members: dict) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            data = payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_tar_download(tmp_path, serve, split):
    rng = np.random.default_rng(0)
    batches = {f"cifar-10-batches-py/data_batch_{i}": cifar_batch(rng, 3, {b"labels": 10}) for i in range(1, 6)}
    batches["cifar-10-batches-py/test_batch"] = cifar_batch(rng, 4, {b"labels": 10})
    batches["cifar-10-batches-py/batches.meta"] = {b"label_names": [b"airplane"]}
    served = tmp_path / "server"
    served.mkdir()
    archive = served / "cifar-10-python.tar.gz"
    write_tar_gz(archive, batches)
    ds = load_dataset("cifar10", split=split, root=tmp_path / "cache", base_url=serve(served), progress=False,
                      checksums={archive.name: md5_of(archive)})
    names = [n for n in batches if ("test" in n) == (split == "test") and "meta" not in n]
    data = np.concatenate([batches[n][b"data"] for n in names])
    assert ds.images.shape == (len(data), 3, 32, 32) and ds.num_classes == 10
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert ds.labels.tolist() == sum((batches[n][b"labels"] for n in names), [])
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.class_names[0] == "airplane"
    with pytest.raises(RuntimeError, match="checksum mismatch"):  # the official md5 still guards the same file
        load_dataset("cifar10", split=split, root=tmp_path / "cache", download=False)


def test_cifar100_fine_labels_and_extracted_folder(tmp_path):
    rng = np.random.default_rng(1)
    batches = {"cifar-100-python/train": cifar_batch(rng, 6, {b"fine_labels": 100, b"coarse_labels": 20}),
               "cifar-100-python/test": cifar_batch(rng, 2, {b"fine_labels": 100, b"coarse_labels": 20})}
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_tar_gz(archive, batches)
    ds = load_dataset("cifar100", root=tmp_path, download=False, checksums={archive.name: md5_of(archive)})
    assert ds.labels.tolist() == batches["cifar-100-python/train"][b"fine_labels"]
    assert ds.num_classes == 100 and len(ds.class_names) == 100 and ds.class_names[-1] == "worm"
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as handle:
        handle.extractall(extracted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    from_folder = load_dataset("cifar100", split="test", root=extracted, download=False)
    assert from_folder.labels.tolist() == batches["cifar-100-python/test"][b"fine_labels"]


def test_corrupt_tar_and_unsafe_pickle(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"definitely not gzip")
    with pytest.raises(RuntimeError, match="cifar-10-python.tar.gz is not a readable tar.gz"):
        load_dataset("cifar10", split="test", root=tmp_path, download=False, checksums={archive.name: None})
    write_tar_gz(archive, {"cifar-10-batches-py/test_batch": pickle.dumps(os.getcwd)})
    with pytest.raises(RuntimeError, match="test_batch is not a CIFAR python batch.*refusing"):
        load_dataset("cifar10", split="test", root=tmp_path, download=False, checksums={archive.name: None})
    write_tar_gz(archive, {"cifar-10-batches-py/data_batch_1": {}})
    with pytest.raises(RuntimeError, match="lacks the CIFAR batch"):
        load_dataset("cifar10", split="test", root=tmp_path, download=False, checksums={archive.name: None})


def test_svhn_mat_download_and_corrupt(tmp_path, serve):
    import scipy.io

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)
    served = tmp_path / "server"
    served.mkdir()
    scipy.io.savemat(served / "test_32x32.mat", {"X": x, "y": y})
    md5 = md5_of(served / "test_32x32.mat")
    ds = load_dataset("svhn", split="test", root=tmp_path / "cache", base_url=serve(served) + "/", progress=False,
                      checksums={"test_32x32.mat": md5})
    assert ds.labels.tolist() == [0, 1, 9, 0, 3] and ds.images.shape == (5, 3, 32, 32)
    assert int(ds.images[2, 1, 4, 7]) == int(x[4, 7, 1, 2])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_32x32.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(RuntimeError, match="train_32x32.mat is not a readable SVHN"):
        load_dataset("svhn", root=tmp_path / "bad", download=False, checksums={"train_32x32.mat": None})


@needs_mnist
def test_truncated_gzip_names_file(tmp_path):
    for name in MNIST_FILES:
        shutil.copy(MNIST_T10K / name, tmp_path / name)
    truncated = tmp_path / MNIST_FILES[0]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(RuntimeError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", split="test", root=tmp_path, download=False, checksums={MNIST_FILES[0]: None})


def test_download_failures_are_download_errors(tmp_path, serve, monkeypatch):
    from fastdd.data.download import DownloadError

    served = tmp_path / "server"
    (served / "kmnist").mkdir(parents=True)
    monkeypatch.setenv("FASTDD_MIRROR", serve(served))
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "cache"))
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/kmnist/t10k-images"):
        load_dataset("kmnist", split="test", progress=False)
    (served / "kmnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"mirror copy")
    with pytest.raises(DownloadError, match="checksum mismatch.*5c965bf0a639b31b8f53240b1b52f4d7"):
        load_dataset("kmnist", split="test", progress=False)
    assert list((tmp_path / "cache" / "kmnist").iterdir()) == []


def test_unreachable_host_is_a_download_error(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    from fastdd.data.download import DownloadError, download_file

    with socket.socket() as probe:  # a loopback port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=f"could not download http://127.0.0.1:{port}/x.gz"):
        download_file(f"http://127.0.0.1:{port}/x.gz", tmp_path / "x.gz", None, progress=False, timeout_s=5)
    assert list(tmp_path.iterdir()) == []
