"""Tests for fastdd.data.subpop: rare subgroup per class, balanced test groups, rotation and thinning transforms."""
import math

import pytest
import torch

from fastdd.data import from_tensors, load_dataset
from fastdd.data.subpop import group_ids, make_subpop_shift, rotate_images, thin_strokes


def _pool(n_per_class=60, classes=3, size=12):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n_per_class * classes, 1, size, size, dtype=torch.uint8)
    images[:, :, 2:-2, size // 2 - 1:size // 2 + 2] = 200  # a thick vertical bar
    images[:, :, 2:4, 3:-3] = torch.randint(100, 255, (n_per_class * classes, 1, 2, size - 6), generator=g,
                                            dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return from_tensors(images, labels, name="toy", num_classes=classes)


def test_split_sizes_groups_and_balance():
    pool = _pool()
    train, test = make_subpop_shift(pool, rare_fraction=0.1, test_fraction=0.25, seed=3)
    assert len(train) + len(test) == len(pool)
    assert train.domain_names == ["common", "rotated"] and test.domain_names == ["common", "rotated"]
    for c in range(3):
        tr = train.domains[train.labels == c]
        te = test.domains[test.labels == c]
        assert te.numel() == 14 and int(te.sum()) == 7  # round(0.25 * 60) = 15 -> 14, half of it rare
        assert int(tr.sum()) == round(0.1 * 46) and tr.numel() == 46
    cells = torch.bincount(group_ids(test), minlength=6)
    assert (cells == cells[0]).all()
    assert train.mean == test.mean and train.std == test.std


def test_rare_images_are_transformed_and_common_untouched():
    pool = _pool()
    train, test = make_subpop_shift(pool, rare_fraction=0.2, seed=1)
    bar = pool.images[0]
    for ds in (train, test):
        common = ds.images[ds.domains == 0]
        rare = ds.images[ds.domains == 1]
        assert torch.equal(common[:, :, 4:-2], bar[:, 4:-2].expand_as(common[:, :, 4:-2]))
        assert (rare[:, :, 4:-2] != bar[:, 4:-2]).flatten(1).any(1).all()


def test_deterministic_and_seed_dependent():
    pool = _pool()
    a, b, c = (make_subpop_shift(pool, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.domains, b.test.domains)
    assert not torch.equal(a.train.domains, c.train.domains)


def test_rotate_images_quarter_turn_matches_rot90():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 2, 8, 8), generator=g, dtype=torch.uint8)
    out = rotate_images(images, torch.full((3,), 90.0))
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(2, 3)), atol=1, rtol=0)  # counter-clockwise
    assert torch.equal(rotate_images(images, torch.zeros(3)), images)


def test_thin_strokes_thins_but_never_erases():
    bar = torch.zeros(2, 1, 10, 10, dtype=torch.uint8)
    bar[0, 0, 1:-1, 3:7] = 255  # 4 pixels wide
    bar[1, 0, 1:-1, 5] = 255  # 1 pixel wide: eroding it would leave nothing
    out = thin_strokes(bar, steps=2)
    assert int((out[0] > 0).sum(-1).max()) == 2
    assert torch.equal(out[1], bar[1])


def test_thin_transform_groups():
    train, test = make_subpop_shift(_pool(), transform="thin", seed=0)
    assert train.domain_names == ["common", "thinned"]
    rare = test.images[test.domains == 1].float().sum((1, 2, 3))
    common = test.images[test.domains == 0].float().sum((1, 2, 3))
    assert rare.mean() < 0.8 * common.mean()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(transform="blur"), ValueError, "transform must be one of"),
    (dict(rare_fraction=0.0), ValueError, r"rare_fraction must lie in \(0, 1\)"),
    (dict(test_fraction=1.0), ValueError, r"test_fraction must lie in \(0, 1\)"),
    (dict(angle_range=(90, 60)), ValueError, "angle_range"),
    (dict(test_fraction=0.01), ValueError, "class 0 has 60 images, too few"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_subpop_shift(_pool(), **kwargs)


def test_group_ids_needs_domains():
    with pytest.raises(ValueError, match="carries no group labels"):
        group_ids(_pool())


def test_shared_mnist_pool(mnist_t10k_dir):
    pool = load_dataset("mnist", "test", root=mnist_t10k_dir, download=False)
    train, test = make_subpop_shift(pool, rare_fraction=0.05, test_fraction=0.2, seed=0)
    assert train.name == "mnist-subpop-rotate" and train.images.dtype == torch.uint8
    for c in range(10):  # the documented counts: even balanced test part, round(5%) of the rest rare
        n = int((pool.labels == c).sum())
        n_test = 2 * (math.floor(0.2 * n + 0.5) // 2)
        n_rare = max(1, math.floor(0.05 * (n - n_test) + 0.5))
        assert int((train.labels == c).sum()) == n - n_test and int(train.domains[train.labels == c].sum()) == n_rare
        assert torch.bincount(test.domains[test.labels == c], minlength=2).tolist() == [n_test // 2] * 2
