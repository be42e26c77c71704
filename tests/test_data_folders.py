"""Tests for users' own data: from_npz, image_folder (root/class/img) and domain_folder (root/domain/class/img)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdd.data import domain_folder, from_npz, image_folder


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def pixel(value, rgb=True, size=(4, 6)):
    return np.full(size + ((3,) if rgb else ()), value, dtype=np.uint8)


def test_image_folder_rgb(tmp_path):
    write_png(tmp_path / "cat" / "a.png", pixel(10))
    write_png(tmp_path / "cat" / "b.png", pixel(20))
    write_png(tmp_path / "ant" / "c.png", pixel(30))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = image_folder(tmp_path)
    assert ds.class_names == ["ant", "cat"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 3, 4, 6) and ds.images[:, 0, 0, 0].tolist() == [30, 10, 20]
    np.testing.assert_allclose(ds.mean, [20 / 255] * 3, atol=1e-6)


def test_image_folder_mixed_modes_and_resize(tmp_path):
    write_png(tmp_path / "a" / "gray.png", pixel(50, rgb=False, size=(8, 8)))
    write_png(tmp_path / "b" / "color.png", pixel(70, size=(16, 16)))
    ds = image_folder(tmp_path, image_size=4)
    assert ds.images.shape == (2, 3, 4, 4)
    assert ds.images[0].unique().tolist() == [50] and ds.images[1].unique().tolist() == [70]
    with pytest.raises(ValueError, match="image_size"):
        image_folder(tmp_path)


def test_image_folder_grayscale(tmp_path):
    write_png(tmp_path / "x" / "1.png", pixel(0, rgb=False))
    write_png(tmp_path / "y" / "1.png", pixel(255, rgb=False))
    ds = image_folder(tmp_path, image_size=(2, 3))
    assert ds.images.shape == (2, 1, 2, 3) and ds.channels == 1


def test_image_folder_errors_name_the_path(tmp_path):
    write_png(tmp_path / "a" / "ok.png", pixel(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        image_folder(tmp_path)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=str(tmp_path / "empty" / "broken.png")):
        image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        image_folder(tmp_path / "missing")


def test_domain_folder_union_of_classes(tmp_path):
    write_png(tmp_path / "photo" / "dog" / "1.png", pixel(1))
    write_png(tmp_path / "photo" / "cat" / "1.png", pixel(2))
    write_png(tmp_path / "sketch" / "dog" / "1.png", pixel(3))
    write_png(tmp_path / "sketch" / "elk" / "1.png", pixel(4))
    ds = domain_folder(tmp_path)
    assert ds.domain_names == ["photo", "sketch"] and ds.class_names == ["cat", "dog", "elk"]
    assert ds.domains.tolist() == [0, 0, 1, 1] and ds.labels.tolist() == [0, 1, 1, 2]
    assert ds.images[:, 0, 0, 0].tolist() == [2, 1, 3, 4]
    (tmp_path / "sketch" / "fox").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "sketch" / "fox")):
        domain_folder(tmp_path)


def test_from_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", images=nhwc, labels=labels, domains=np.array([0, 0, 0, 1, 1, 1]))
    ds = from_npz(tmp_path / "nhwc.npz")
    assert ds.images.shape == (6, 3, 5, 5) and ds.name == "nhwc"
    assert torch.equal(ds.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert ds.domains.tolist() == [0, 0, 0, 1, 1, 1] and ds.domain_names == ["0", "1"]
    nchw = nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.savez(tmp_path / "nchw.npz", images=nchw, labels=labels, class_names=np.array(["a", "b", "c"]))
    again = from_npz(tmp_path / "nchw.npz")
    assert torch.equal(again.images, ds.images) and again.class_names == ["a", "b", "c"]
    np.savez(tmp_path / "bad.npz", pictures=nhwc)
    with pytest.raises(ValueError, match="bad.npz has no array 'images'"):
        from_npz(tmp_path / "bad.npz")
