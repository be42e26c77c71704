"""Domain data: rotation, Rotated-/Colored-MNIST builders, leave-one-domain-out splits, per-domain sampling, metrics."""
import pytest
import torch

from fastdd.data import from_tensors, load_dataset
from fastdd.data.mnist_pool import mnist_pool
from fastdd.data.domains import (DomainClassSampler, colored_mnist, leave_one_domain_out, rotate_images,
                                 rotated_mnist, source_domains, split_per_domain)
from fastdd.distill import build_config
from fastdd.distill.datasets import load_run_data
from fastdd.distill.methods.sgs_data import domain_accuracy_metric


def _digits_like(n=120, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return from_tensors(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
                        torch.arange(n) % classes, num_classes=classes, mean=(0.5,), std=(0.3,))


def test_rotation_matches_exact_quarter_turns_and_is_counter_clockwise():
    x = torch.randint(0, 256, (3, 2, 6, 6), dtype=torch.uint8)
    assert torch.equal(rotate_images(x, 0), x)
    assert torch.equal(rotate_images(x, 90), torch.rot90(x, 1, (2, 3)))  # numpy/torch rot90: counter-clockwise
    assert torch.equal(rotate_images(x, 180), x.flip(2, 3))
    y = torch.zeros(1, 1, 5, 5)
    y[0, 0, 0, 4] = 1.0  # top-right corner goes to top-left under a counter-clockwise quarter turn
    assert rotate_images(y, 90)[0, 0, 0, 0] == 1.0 and rotate_images(y, 90).sum() == 1.0


def _rotate_oracle(img, angle):
    """Per-pixel inverse mapping: output (x, y) (y down, from the centre) samples the input at
    (x cos - y sin, x sin + y cos), bilinear, zero outside."""
    import math
    h, w = img.shape
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = torch.zeros(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            x, y = j - cx, i - cy
            sx, sy = x * c - y * s + cx, x * s + y * c + cy
            x0, y0 = math.floor(sx), math.floor(sy)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[i, j] += wy * wx * float(img[yy, xx])
    return out


@pytest.mark.parametrize("angle", [15, 45, -30, 75])
def test_rotation_is_bilinear_about_the_centre(angle):
    g = torch.Generator().manual_seed(angle % 7)
    for shape in ((7, 7), (6, 9)):  # odd and even sides, square and not
        img = torch.rand(*shape, generator=g, dtype=torch.float64)
        out = rotate_images(img[None, None], angle)[0, 0]
        torch.testing.assert_close(out, _rotate_oracle(img, angle), atol=1e-9, rtol=0)
    y = torch.zeros(1, 1, 7, 7)
    y[0, 0, 3, 3] = 1.0  # the centre pixel stays put under any rotation
    assert rotate_images(y, angle)[0, 0, 3, 3] == pytest.approx(1.0, abs=1e-6)


def test_rotated_mnist_puts_each_image_in_one_domain_rotated_by_its_angle():
    src = _digits_like(n=60)
    ds = rotated_mnist(src, seed=3)
    assert ds.domain_names == ["0", "15", "30", "45", "60", "75"]
    assert torch.bincount(ds.domains).tolist() == [10] * 6
    assert torch.equal(ds.labels, src.labels) and ds.mean == src.mean
    for d, angle in enumerate((0, 15, 30, 45, 60, 75)):
        rows = ds.domains == d
        assert torch.equal(ds.images[rows], rotate_images(src.images[rows], angle))
    assert torch.equal(rotated_mnist(src, seed=3).domains, ds.domains)  # deterministic
    assert not torch.equal(rotated_mnist(src, seed=4).domains, ds.domains)


def test_colored_mnist_colours_follow_the_environment_probabilities():
    src = from_tensors(torch.full((40, 1, 28, 28), 200, dtype=torch.uint8), torch.arange(40) % 10, num_classes=10)
    ds = colored_mnist(src, environments=(("agree", 0.0), ("flip", 1.0)), label_noise=0.0)
    assert ds.images.shape == (40, 2, 14, 14) and ds.num_classes == 2
    assert torch.equal(ds.labels, (src.labels >= 5).long())
    kept = ds.images.flatten(2).amax(2) > 0  # [N, 2]: exactly one channel carries the digit
    assert torch.equal(kept.sum(1), torch.ones(40, dtype=torch.long))
    colour = kept[:, 1].long()  # channel 0 (red) <- colour 0, channel 1 (green) <- colour 1
    assert torch.equal(colour[ds.domains == 0], ds.labels[ds.domains == 0])
    assert torch.equal(colour[ds.domains == 1], 1 - ds.labels[ds.domains == 1])
    assert colored_mnist(src, downsample=False).images.shape == (40, 2, 28, 28)
    noisy = colored_mnist(_digits_like(n=4000, classes=10), label_noise=0.25)
    flipped = float((noisy.labels != (torch.arange(4000) % 10 >= 5).long()).float().mean())
    assert 0.22 < flipped < 0.28


def test_leave_one_domain_out_and_its_errors():
    ds = rotated_mnist(_digits_like(n=120), seed=0)
    source, target = leave_one_domain_out(ds, 75)
    assert set(source.domains.tolist()) == {0, 1, 2, 3, 4} and set(target.domains.tolist()) == {5}
    assert len(source) + len(target) == 120 and source.domain_names == ds.domain_names
    assert source_domains(ds, "60") == [0, 1, 2, 3, 5]
    with pytest.raises(ValueError, match=r"holdout_domain 90 is not a domain .* valid domains: 0, 15, 30, 45, 60, 75"):
        leave_one_domain_out(ds, 90)
    two = ds.subset(ds.domains < 2)
    with pytest.raises(ValueError, match=r"at least 2 source domains, got 1 \['15'\] .* after holding out 0"):
        leave_one_domain_out(two, 0)
    gap = ds.subset(~((ds.domains == 2) & (ds.labels == 3)))
    with pytest.raises(ValueError, match="class '3' has no samples in domain '30'"):
        leave_one_domain_out(gap, 75)
    with pytest.raises(ValueError, match="has no domain labels"):
        source_domains(_digits_like())


def test_split_per_domain_is_stratified_by_class_and_domain():
    ds = rotated_mnist(_digits_like(n=600), seed=1)
    pool, test = split_per_domain(ds, 0.3)
    assert len(pool) + len(test) == 600
    counts = torch.zeros(6, 4, dtype=torch.long).index_put_((test.domains, test.labels), torch.ones_like(test.labels),
                                                             accumulate=True)
    full = torch.zeros(6, 4, dtype=torch.long).index_put_((ds.domains, ds.labels), torch.ones_like(ds.labels),
                                                           accumulate=True)
    assert torch.equal(counts, torch.floor(full * 0.3 + 0.5).long())


def test_domain_class_sampler_draws_n_per_class_and_source_domain():
    ds = rotated_mnist(_digits_like(n=600), seed=1)
    sampler = DomainClassSampler(ds.labels, ds.domains, 4, [0, 2, 5])
    g = torch.Generator().manual_seed(0)
    idx, cls, dom = sampler.sample(5, generator=g)
    assert len(idx) == 4 * 3 * 5 and len(set(idx.tolist())) == len(idx)
    assert torch.equal(ds.labels[idx], cls)
    assert torch.equal(ds.domains[idx], torch.tensor([0, 2, 5])[dom])
    pairs = torch.bincount(cls * 3 + dom, minlength=12)
    assert pairs.tolist() == [5] * 12
    again, _, _ = sampler.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, idx)


def test_domain_accuracy_metric_splits_predictions_by_domain():
    test = from_tensors(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), [0, 1, 0, 1, 0, 1], num_classes=2,
                        domains=[0, 0, 1, 1, 2, 2], domain_names=["a", "b", "c"])
    predictions = torch.tensor([0, 1, 1, 1, 1, 0])  # a: 2/2, b: 1/2, c: 0/2
    out = domain_accuracy_metric(2, test.domain_names)(None, test, predictions)
    assert out == {"ood_accuracy": 0.0, "id_accuracy": 0.75, "accuracy_domain_a": 1.0, "accuracy_domain_b": 0.5,
                   "accuracy_domain_c": 0.0}


def test_rotated_mnist_builder_on_the_shared_t10k(mnist_t10k_dir):
    config = build_config(overrides=["dataset=rotated-mnist", f"data_dir={mnist_t10k_dir}", "method=sgs",
                                     "holdout_domain=45"])
    train, test, evaluators = load_run_data(config)
    full = rotated_mnist(load_dataset("mnist", split="test", root=str(mnist_t10k_dir)))
    n = torch.zeros(6, 10, dtype=torch.long).index_put_((full.domains, full.labels), torch.ones_like(full.labels),
                                                         accumulate=True)
    n_test = torch.floor(n * 0.3 + 0.5).long()  # per (domain, class): 30% test, the holdout (45°) out of train
    assert torch.bincount(test.domains * 10 + test.labels, minlength=60).view(6, 10).tolist() == n_test.tolist()
    n_train = (n - n_test).index_fill(0, torch.tensor([3]), 0)
    assert torch.bincount(train.domains * 10 + train.labels, minlength=60).view(6, 10).tolist() == n_train.tolist()
    assert evaluators[0].holdout == 3
    default = load_run_data(build_config(overrides=["dataset=rotated-mnist", f"data_dir={mnist_t10k_dir}"]))[0]
    assert 5 not in default.domains.tolist()  # holdout 75 unless told otherwise
    colored = load_run_data(build_config(overrides=["dataset=colored-mnist", f"data_dir={mnist_t10k_dir}"]))
    assert colored[0].channels == 2 and set(colored[0].domains.tolist()) == {0, 1}


def test_mnist_pool_combines_train_and_t10k_when_both_are_there(tmp_path, monkeypatch):
    from fastdd.data import mnist_pool as pool_module
    parts = {"train": _digits_like(n=6, classes=10, seed=1), "test": _digits_like(n=4, classes=10, seed=2)}
    loaded = []
    monkeypatch.setattr(pool_module, "load_dataset", lambda name, split, root: loaded.append(split) or parts[split])
    only, both, none = tmp_path / "only", tmp_path / "both", tmp_path / "none"
    for folder, names in ((only, ["t10k"]), (both, ["t10k", "train"]), (none, [])):
        folder.mkdir()
        for name in names:
            (folder / f"{name}-images-idx3-ubyte.gz").touch()
    assert mnist_pool(str(only)) is parts["test"] and loaded == ["test"]
    combined = mnist_pool(str(both))
    assert loaded == ["test", "train", "test"]
    assert torch.equal(combined.images, torch.cat([parts["train"].images, parts["test"].images]))
    assert torch.equal(combined.labels, torch.cat([parts["train"].labels, parts["test"].labels]))
    assert combined.mean == parts["train"].mean and combined.num_classes == 10
    with pytest.raises(FileNotFoundError, match="no MNIST files"):
        mnist_pool(str(none))
