"""Tests for ClassSampler: distinct per-class draws, counts, reproducibility and take()."""
import pytest
import torch

from fastdd.data import ClassSampler

SIZES = [7, 0, 3, 12, 5]


def make_labels(seed=0):
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(SIZES)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("n", [0, 1, 4, 7, 100])
def test_sample_counts_classes_and_distinct(n):
    labels = make_labels()
    sampler = ClassSampler(labels, len(SIZES))
    idx, seg = sampler.sample(n, torch.Generator().manual_seed(3))
    assert idx.dtype == torch.int64 and seg.dtype == torch.int64 and idx.shape == seg.shape
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(labels[idx], seg)
    assert torch.equal(seg, seg.sort().values)  # grouped by class, ascending
    expected = [min(n, size) for size in SIZES]
    assert torch.bincount(seg, minlength=len(SIZES)).tolist() == expected


def test_small_class_gives_all_samples():
    labels = make_labels()
    idx, seg = ClassSampler(labels, len(SIZES)).sample(5)
    assert sorted(idx[seg == 2].tolist()) == sorted(torch.nonzero(labels == 2).flatten().tolist())


def test_reproducible_and_random():
    sampler = ClassSampler(make_labels(), len(SIZES))
    first = sampler.sample(3, torch.Generator().manual_seed(11))
    second = sampler.sample(3, torch.Generator().manual_seed(11))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    draws = {tuple(sampler.sample(3, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)}
    assert len(draws) > 10


def test_sample_is_uniform_within_a_class():
    labels = torch.tensor([0] * 4 + [1] * 6)
    sampler = ClassSampler(labels, 2)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(10)
    trials = 2000
    for _ in range(trials):
        idx, _ = sampler.sample(2, g)
        hits[idx] += 1
    torch.testing.assert_close(hits[:4] / trials, torch.full((4,), 0.5), atol=0.05, rtol=0)
    torch.testing.assert_close(hits[4:] / trials, torch.full((6,), 2 / 6), atol=0.05, rtol=0)


def test_take_shape_and_error_names_class():
    labels = make_labels()
    sampler = ClassSampler(labels, len(SIZES))
    with pytest.raises(ValueError, match=r"IPC larger than a class's size: class 1 has 0"):
        sampler.take(1)
    dense = labels
    sampler = ClassSampler(torch.cat([dense, torch.tensor([1, 1, 1])]), len(SIZES))
    idx = sampler.take(3, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 3) and idx.unique().numel() == 15
    assert torch.equal(sampler.labels[idx], torch.arange(5).unsqueeze(1).expand(5, 3))
    with pytest.raises(ValueError, match="class 1 has 3 samples"):
        sampler.take(4)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        ClassSampler(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="n_per_class"):
        ClassSampler(torch.tensor([0, 1]), 2).sample(-1)


def test_large_pool_is_fast_and_correct():
    labels = torch.randint(0, 100, (50_000,), generator=torch.Generator().manual_seed(0))
    sampler = ClassSampler(labels, 100)
    idx, seg = sampler.sample(256, torch.Generator().manual_seed(1))
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(torch.bincount(seg, minlength=100), sampler.class_sizes.clamp(max=256))
