"""Tests for ImageDataset, from_tensors, split_dataset and the built-in offline digits dataset."""
import numpy as np
import pytest
import torch

from fastdd.data import DATASETS, ImageDataset, channel_stats, from_tensors, load_dataset, split_dataset
from fastdd.data.registry import DIGITS_MEAN, DIGITS_STD


def make_dataset(n=40, channels=3, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 5, 6), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageDataset(images=images, labels=labels, num_classes=num_classes, mean=(0.5,) * channels,
                        std=(0.25,) * channels, name="toy")


def test_properties_and_counts():
    ds = make_dataset()
    assert len(ds) == 40 and ds.channels == 3 and ds.image_size == (5, 6)
    assert ds.class_counts().tolist() == [10, 10, 10, 10]
    assert ds.class_names == ["0", "1", "2", "3"]
    assert ds.images.is_contiguous() and ds.images.device.type == "cpu"


@pytest.mark.parametrize("field_name, kwargs", [
    ("images", dict(images=torch.zeros(4, 1, 2, 2))),
    ("images", dict(images=torch.zeros(4, 2, 2, dtype=torch.uint8))),
    ("labels", dict(labels=torch.zeros(4, dtype=torch.int32))),
    ("labels", dict(labels=torch.tensor([0, 1, 2, 3]))),
    ("labels", dict(labels=torch.zeros(3, dtype=torch.int64))),
    ("mean", dict(mean=(0.5, 0.5))),
    ("std", dict(std=(0.0,))),
    ("class_names", dict(class_names=["a"])),
    ("domains", dict(domains=torch.tensor([0, 0, 1, 2]), domain_names=["x", "y"])),
])
def test_validation_names_the_field(field_name, kwargs):
    base = dict(images=torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels=torch.tensor([0, 1, 0, 1]),
                num_classes=2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=field_name):
        ImageDataset(**{**base, **kwargs})


def test_normalize_formula_and_round_trip():
    ds = make_dataset()
    batch = ds.images[:8]
    x = ds.normalize(batch)
    assert x.dtype == torch.float32 and x.shape == batch.shape
    torch.testing.assert_close(x, (batch.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(ds.denormalize(x), batch.float() / 255)
    x64 = ds.normalize(batch, device="cpu", dtype=torch.float64)
    assert x64.dtype == torch.float64
    assert ds.images.dtype == torch.uint8  # storage untouched
    with pytest.raises(TypeError, match="uint8"):
        ds.normalize(batch.float())


def test_denormalize_clamps():
    ds = make_dataset()
    out = ds.denormalize(torch.full((1, 3, 2, 2), 100.0))
    assert float(out.max()) == 1.0


def test_subset_keeps_metadata():
    ds = make_dataset()
    part = ds.subset(torch.tensor([3, 0, 7]))
    assert part.labels.tolist() == [3, 0, 3]
    assert torch.equal(part.images[1], ds.images[0])
    assert part.mean == ds.mean and part.class_names == ds.class_names and part.num_classes == 4
    assert len(ds.subset(ds.labels == 1)) == 10
    assert len(ds.subset([1, 2])) == 2


def test_from_tensors_float_and_stats():
    g = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(20) % 5
    ds = from_tensors(uint8.float() / 255, labels)
    assert torch.equal(ds.images, uint8) and ds.num_classes == 5 and ds.name == "tensors"
    pixels = uint8.permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=1), atol=1e-9)
    np.testing.assert_allclose(ds.std, pixels.std(axis=1), atol=1e-9)
    gray = from_tensors(uint8[:, 0].numpy(), labels.numpy().astype(np.int32), num_classes=7, mean=(0.1,), std=(0.2,))
    assert gray.images.shape == (20, 1, 4, 4) and gray.num_classes == 7 and gray.mean == (0.1,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        from_tensors(uint8.float(), labels)


def test_from_tensors_domains():
    ds = from_tensors(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), [0, 1, 0, 1, 0, 1], domains=[0, 0, 1, 1, 2, 2],
                      domain_names=["a", "b", "c"])
    assert ds.domains.dtype == torch.int64 and ds.domain_names == ["a", "b", "c"]
    assert ds.subset([4, 5]).domains.tolist() == [2, 2]


def test_split_dataset_is_stratified_disjoint_and_deterministic():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 30, 21, 1])])
    ds = from_tensors(torch.arange(102, dtype=torch.uint8).view(102, 1, 1, 1), labels)
    train, test = split_dataset(ds, 0.2, seed=0)
    assert test.class_counts().tolist() == [10, 6, 4, 0]
    assert train.class_counts().tolist() == [40, 24, 17, 1]
    train_ids, test_ids = set(train.images.flatten().tolist()), set(test.images.flatten().tolist())
    assert not train_ids & test_ids and len(train_ids | test_ids) == 102
    again_train, again_test = split_dataset(ds, 0.2, seed=0)
    assert torch.equal(again_test.images, test.images)
    assert not torch.equal(split_dataset(ds, 0.2, seed=1)[1].images, test.images)
    assert torch.equal(test.images.flatten(), test.images.flatten().sort().values)  # original order kept
    with pytest.raises(ValueError, match="test_fraction"):
        split_dataset(ds, 1.5)


def test_digits_offline_split_and_stats():
    from sklearn.datasets import load_digits

    assert DATASETS == ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn")
    train, test = load_dataset("digits"), load_dataset("digits", split="test", download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert len(train) == 1438 and len(test) == 359
    assert int(train.class_counts().sum()) == len(train)
    reference = np.bincount(load_digits().target)
    assert (train.class_counts() + test.class_counts()).tolist() == reference.tolist()
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    mean, std = channel_stats(train.images)
    assert train.mean == DIGITS_MEAN and train.std == DIGITS_STD
    np.testing.assert_allclose(mean, DIGITS_MEAN, atol=1e-4)
    np.testing.assert_allclose(std, DIGITS_STD, atol=1e-4)
    assert torch.equal(load_dataset("digits", split="test").images, test.images)
    x = train.normalize(train.images[:16])
    torch.testing.assert_close(train.denormalize(x), train.images[:16].float() / 255)


def test_digits_scaling_matches_sklearn():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    scaled = np.rint(raw * 255 / 16).astype(np.uint8)
    ds_all = torch.cat([load_dataset("digits").images, load_dataset("digits", split="test").images])
    assert sorted(map(bytes, ds_all.numpy())) == sorted(map(bytes, scaled[:, None]))


def test_unknown_name_and_split():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
