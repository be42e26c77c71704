"""Prepared shards as ImageDatasets: the images tensor is the file's memory map (gathers touch only their rows),
manifest checks name the bad file, and the engine-side gathers (normalize, subset, SyntheticSet) match RAM."""
import json
import sys

import numpy as np
import pytest
import torch
from numpy.lib.format import open_memmap
from PIL import Image

from fastdd.data import ClassSampler, from_tensors, load_prepared, load_prepared_splits
from fastdd.data.prepare import prepare
from fastdd.data.shards import file_sha256
from fastdd.distill.synthetic import SyntheticSet

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(4):
            folder = tmp_path / "src" / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    prepare(tmp_path / "src", tmp_path / "out", size=8, test_fraction=0.25, workers=1, progress=False)
    return tmp_path / "out"


def big_prepared(folder, rows, size=64, classes=2):
    """Rewrites a prepared folder's train split as `rows` random rows (tens of MB), manifest to match."""
    manifest = json.loads((folder / "manifest.json").read_text())
    images = open_memmap(folder / "train_images.npy", mode="w+", dtype=np.uint8, shape=(rows, 3, size, size))
    rng = np.random.default_rng(1)
    for start in range(0, rows, 1000):
        images[start:start + 1000] = rng.integers(0, 256, images[start:start + 1000].shape, dtype=np.uint8)
    images.flush()
    del images
    labels = np.arange(rows, dtype=np.int64) % classes
    np.save(folder / "train_labels.npy", labels)
    manifest["size"] = size
    manifest["splits"]["train"].update(count=rows, class_counts=np.bincount(labels).tolist(),
                                       sha256_images=file_sha256(folder / "train_images.npy"),
                                       sha256_labels=file_sha256(folder / "train_labels.npy"))
    manifest["splits"].pop("test")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def file_mapping(address):
    """(path, resident kB) of the /proc/self/smaps mapping holding `address`."""
    current = None
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = (fields[5] if len(fields) > 5 else "") if start <= address < end else None
            elif current is not None and fields[0] == "Rss:":
                return current, int(fields[1])
    return None, None


@linux_only
def test_images_are_the_memory_map_and_sampling_touches_only_sampled_rows(prepared):
    rows = 6000  # 6000 x 3 x 64 x 64 = 74 MB
    big_prepared(prepared, rows)
    load_prepared(prepared, verify=True)
    train = load_prepared(prepared)
    path, resident_kb = file_mapping(train.images.data_ptr())
    assert path == str(prepared / "train_images.npy")
    assert resident_kb < 1024, resident_kb
    index = ClassSampler(train.labels, train.num_classes).sample(2, generator=torch.Generator().manual_seed(0))[0]
    batch = train.normalize(train.images[index])
    _, resident_kb = file_mapping(train.images.data_ptr())
    # 4 rows of 12 kB; the kernel maps whole folios around each fault (up to 2 MB each), still far from 74 MB
    assert resident_kb < 12 * 1024, resident_kb
    on_disk = np.load(prepared / "train_images.npy", mmap_mode="r")[index.numpy()]
    mean = torch.tensor(train.mean).view(-1, 1, 1)
    std = torch.tensor(train.std).view(-1, 1, 1)
    torch.testing.assert_close(batch, (torch.from_numpy(on_disk).float() / 255 - mean) / std)


def test_engine_gathers_match_an_in_memory_dataset(prepared):
    train, test = load_prepared_splits(prepared)
    in_ram = from_tensors(np.load(prepared / "train_images.npy"), np.load(prepared / "train_labels.npy"),
                          mean=train.mean, std=train.std)
    assert (len(train), len(test), train.class_names) == (6, 2, ["a", "b"])
    picked = train.subset([4, 0, 2])
    assert torch.equal(picked.images, in_ram.images[[4, 0, 2]]) and picked.labels.tolist() == [1, 0, 0]
    real = SyntheticSet.initialise(train, 2, "real", torch.Generator().manual_seed(3), torch.device("cpu"))
    ram = SyntheticSet.initialise(in_ram, 2, "real", torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.testing.assert_close(real.images, ram.images, rtol=0, atol=0)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert train.mean == tuple(manifest["mean"]) and train.std == tuple(manifest["std"])


def test_manifest_mismatches_name_the_file(prepared):
    images_file = prepared / "train_images.npy"
    data = bytearray(images_file.read_bytes())
    data[-1] ^= 0xFF
    images_file.write_bytes(bytes(data))
    load_prepared(prepared)  # shapes still agree; only the checksum can see the change
    with pytest.raises(ValueError, match=f"{images_file}: sha256 of the train images file differs"):
        load_prepared(prepared, verify=True)
    images_file.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="train shard of .* is unreadable"):
        load_prepared(prepared)
    np.save(images_file, np.zeros((6, 3, 8, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{images_file} holds uint8 \\(6, 3, 8, 9\\), its manifest says uint8 "
                                         f"\\(6, 3, 8, 8\\)"):
        load_prepared(prepared)
    labels_file = prepared / "test_labels.npy"
    np.save(labels_file, np.array([0, 0], dtype=np.int64))
    with pytest.raises(ValueError, match=f"{labels_file} class counts differ"):
        load_prepared(prepared, split="test")
    (prepared / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_prepared(prepared)
