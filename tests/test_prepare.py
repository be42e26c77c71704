"""`fastdd prepare`: pixels against a hand-done resize + crop, labels/counts/stats/sha256, skips, --strict,
no-op reruns, interrupted runs leaving nothing, wrong layouts, subsets, val folders and stratified splits."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import fastdd.data.prepare as prep
from fastdd.data.prepare import decode_one, prepare
from fastdd.data.subsets import IMAGENETTE


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    image = image.convert(mode) if mode else image
    image.save(path)


def noise(rng, height, width, channels=3):
    return rng.integers(0, 256, (height, width, channels) if channels > 1 else (height, width), dtype=np.uint8)


def make_tree(root, seed=0):
    """3 classes x 4 images of assorted sizes and modes, one corrupt .jpg and one non-image file."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["ant", "bee", "cat"]):
        save(root / name / "a.png", noise(rng, 25, 30))           # wide: left offset round(1.5) = 2
        save(root / name / "b.jpg", noise(rng, 29, 20))           # tall: top offset round(3.5) = 4
        save(root / name / "c.png", noise(rng, 40, 40, 1))        # grayscale
        save(root / name / "d.png", noise(rng, 16 + c, 50, 4))    # RGBA
    (root / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "bee" / "notes.txt").write_text("not an image")
    return root


def sha256sum(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_decode_matches_hand_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(1)
    wide, tall, gray = noise(rng, 25, 30), noise(rng, 29, 20), noise(rng, 40, 40, 1)
    save(tmp_path / "wide.png", wide)
    save(tmp_path / "tall.png", tall)
    save(tmp_path / "gray.png", gray)
    # wide 30x25 -> shorter side 16: 19x16 (16*30/25 = 19.2, truncated); left = round(3 / 2) = 2 (half to even)
    expected = np.asarray(Image.fromarray(wide).resize((19, 16), Image.BILINEAR).crop((2, 0, 18, 16)))
    np.testing.assert_array_equal(decode_one(tmp_path / "wide.png", 16), expected.transpose(2, 0, 1))
    # tall 20x29 -> 16x23 (16*29/20 = 23.2); top = round(7 / 2) = 4
    expected = np.asarray(Image.fromarray(tall).resize((16, 23), Image.BILINEAR).crop((0, 4, 16, 20)))
    np.testing.assert_array_equal(decode_one(tmp_path / "tall.png", 16), expected.transpose(2, 0, 1))
    # grayscale becomes three equal channels in RGB mode, one channel in L mode
    expected = np.asarray(Image.fromarray(gray).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(decode_one(tmp_path / "gray.png", 16), np.stack([expected] * 3))
    np.testing.assert_array_equal(decode_one(tmp_path / "gray.png", 16, mode="L"), expected[None])


def test_shards_labels_counts_stats_and_checksums(tmp_path):
    src = make_tree(tmp_path / "src")
    manifest = prepare(src, tmp_path / "out", size=16, workers=1, test_fraction=0.25, progress=False)
    out = tmp_path / "out"
    train = np.load(out / "train_images.npy")
    labels = np.load(out / "train_labels.npy")
    test_labels = np.load(out / "test_labels.npy")
    # 4 readable files per class, round(0.25 * n) = 1 test file each; cat's zz_broken.jpg is a train file
    assert manifest["splits"]["test"]["class_counts"] == [1, 1, 1] and test_labels.tolist() == [0, 1, 2]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert manifest["splits"]["train"]["class_counts"] == np.bincount(labels, minlength=3).tolist()
    assert train.shape == (len(labels), 3, 16, 16) and train.dtype == np.uint8
    assert [(entry["path"], entry["split"]) for entry in manifest["skipped"]] == [
        (str(src.resolve() / "cat" / "zz_broken.jpg"), "train")]
    assert manifest["skipped"][0]["reason"].startswith("UnidentifiedImageError: cannot identify image file")
    # every remaining source file appears exactly once: rows equal decode_one of the files in sorted order
    kept = sorted(p for p in src.rglob("*") if p.suffix in (".png", ".jpg") and p.name != "zz_broken.jpg")
    all_rows = np.concatenate([train, np.load(out / "test_images.npy")])
    decoded = np.stack([decode_one(p, 16) for p in kept])
    assert sorted(map(bytes, all_rows)) == sorted(map(bytes, decoded))
    pixels = train.astype(np.float64) / 255
    np.testing.assert_allclose(manifest["mean"], pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(manifest["std"], pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert manifest["splits"]["train"]["sha256_images"] == sha256sum(out / "train_images.npy")
    assert manifest["splits"]["test"]["sha256_labels"] == sha256sum(out / "test_labels.npy")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["filter"] == "PIL.Image.BILINEAR" and on_disk["size"] == 16 and on_disk["mode"] == "RGB"
    assert on_disk["source"] == str(src.resolve()) and on_disk["classes"] == ["ant", "bee", "cat"]
    assert temp_leftovers(tmp_path) == []


def test_process_pool_writes_the_same_bytes_as_one_process(tmp_path):
    src = make_tree(tmp_path / "src")
    one = prepare(src, tmp_path / "one", size=12, workers=1, progress=False)
    pool = prepare(src, tmp_path / "pool", size=12, workers=2, progress=False)
    for split in ("train", "test"):
        assert pool["splits"][split] == one["splits"][split]
    assert pool["mean"] == one["mean"] and pool["skipped"] == one["skipped"]


def test_rerun_is_a_noop_and_other_arguments_need_force(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(src, out, size=8, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(src, out, size=8, workers=1)
    assert again["reused"] and "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(ValueError, match="force"):
        prepare(src, out, size=10, workers=1, progress=False)
    assert np.load(out / "train_images.npy").shape[-1] == 8
    prepare(src, out, size=10, workers=1, force=True, progress=False)
    assert np.load(out / "train_images.npy").shape[-1] == 10 and temp_leftovers(tmp_path) == []
    np.save(out / "test_labels.npy", np.zeros(1, dtype=np.int64))  # damaged: the no-op check notices
    with pytest.raises(ValueError, match="test_labels.npy.*--force"):
        prepare(src, out, size=10, workers=1, progress=False)
    assert not prepare(src, out, size=10, workers=1, force=True, progress=False)["reused"]
    assert prepare(src, out, size=10, workers=1, progress=False)["reused"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a fastdd prepared folder"):
        prepare(src, tmp_path / "user", size=8, workers=1, force=True, progress=False)


def test_strict_names_the_file_and_writes_nothing(tmp_path):
    src = make_tree(tmp_path / "src")
    with pytest.raises(ValueError, match="zz_broken.jpg"):
        prepare(src, tmp_path / "out", size=8, workers=2, strict=True, test_fraction=0.25, seed=3,
                progress=False)
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch, failure):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(src, out, size=8, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = prep.decode_one

    def failing(path, size, mode="RGB"):
        calls.append(path)
        if len(calls) == 5:
            raise failure("injected mid-way")
        return real(path, size, mode)

    monkeypatch.setattr(prep, "decode_one", failing)
    with pytest.raises(failure):
        prepare(src, tmp_path / "fresh", size=8, workers=1, progress=False)
    assert not (tmp_path / "fresh").exists() and temp_leftovers(tmp_path) == []
    calls.clear()
    with pytest.raises(failure):  # replacing an existing OUT: the old one survives untouched
        prepare(src, out, size=9, workers=1, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and temp_leftovers(tmp_path) == []


def test_failed_final_rename_keeps_the_previous_set(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(src, out, size=8, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = prep.os.replace

    def failing_replace(source, target):
        if str(source).endswith(f"out.tmp-{os.getpid()}"):  # the final rename of the finished folder
            raise OSError("disk went away")
        return real_replace(source, target)

    monkeypatch.setattr(prep.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        prepare(src, out, size=9, workers=1, force=True, progress=False)
    monkeypatch.setattr(prep.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and temp_leftovers(tmp_path) == []


def test_temp_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys
    src = make_tree(tmp_path / "src")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f"out.tmp-{int(finished.stdout)}"
    live = tmp_path / f"out.tmp-{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "train_images.npy").write_bytes(b"half written")
    prepare(src, tmp_path / "out", size=8, workers=1, progress=False)
    assert not dead.exists() and live.exists()


def test_wrong_layouts_give_one_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    save(flat / "x.png", noise(rng, 8, 8))
    with pytest.raises(ValueError, match=f"{flat}.*no class sub-folders"):
        prepare(flat, tmp_path / "o1", size=8, workers=1, progress=False)
    empty_class = tmp_path / "empty"
    save(empty_class / "a" / "x.png", noise(rng, 8, 8))
    (empty_class / "b").mkdir()
    (empty_class / "b" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match=f"{empty_class / 'b'} holds no images"):
        prepare(empty_class, tmp_path / "o2", size=8, workers=1, progress=False)
    with pytest.raises(ValueError, match="lacks the class folder.*n01440764.*imagenette"):
        prepare(empty_class, tmp_path / "o3", size=8, subset="imagenette", workers=1, progress=False)
    with pytest.raises(ValueError, match="lacks the class folder.*zebra"):
        prepare(empty_class, tmp_path / "o4", size=8, classes="a,zebra", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        prepare(tmp_path / "missing", tmp_path / "o5", size=8, workers=1, progress=False)
    with pytest.raises(ValueError, match="unknown class subset 'imagenot'"):
        prepare(empty_class, tmp_path / "o6", size=8, subset="imagenot", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "flat"]


def solid(value, height=10, width=12):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_subset_by_wnid_keeps_list_order_and_names(tmp_path):
    src = tmp_path / "train"
    for i, wnid in enumerate(reversed(IMAGENETTE.wnids)):  # folders created in another order on purpose
        save(src / wnid / "0.png", solid(10 + 20 * IMAGENETTE.wnids.index(wnid)))
        save(src / wnid / "1.png", solid(10 + 20 * IMAGENETTE.wnids.index(wnid)))
    save(src / "n99999999" / "0.png", solid(255))
    manifest = prepare(src, tmp_path / "out", size=8, subset="imagenette", test_fraction=0.5, workers=1,
                       progress=False)
    assert manifest["classes"] == list(IMAGENETTE.wnids) and manifest["class_names"][0] == "tench"
    assert manifest["class_names"][-1] == "parachute"
    images = np.load(tmp_path / "out" / "train_images.npy")
    labels = np.load(tmp_path / "out" / "train_labels.npy")
    assert images[:, 0, 0, 0].tolist() == (10 + 20 * labels).tolist() and labels.tolist() == list(range(10))
    custom = prepare(src, tmp_path / "custom", size=8, classes=[IMAGENETTE.wnids[3], IMAGENETTE.wnids[1]],
                     test_fraction=0.5, workers=1, progress=False)
    assert custom["classes"] == [IMAGENETTE.wnids[3], IMAGENETTE.wnids[1]]
    assert np.load(tmp_path / "custom" / "train_images.npy")[:, 0, 0, 0].tolist() == [70, 30]


def test_val_folder_with_class_folders_or_flat_files_and_labels_csv(tmp_path):
    src, val, flat = tmp_path / "train", tmp_path / "val", tmp_path / "ILSVRC" / "val"
    rows = ["ImageId,PredictionString"]
    for c, name in enumerate(["n01", "n02"]):
        for i in range(3):
            save(src / name / f"{i}.png", solid(50 + 100 * c))
        for i in range(2):
            save(val / name / f"v{i}.png", solid(60 + 100 * c, 14, 9))
            save(flat / f"ILSVRC2012_val_{c}{i}.JPEG", solid(60 + 100 * c))
            rows.append(f"ILSVRC2012_val_{c}{i},{name} 1 2 3 4 {name} 5 6 7 8")
    save(flat / "ILSVRC2012_val_99.JPEG", solid(0))
    rows.append("ILSVRC2012_val_99,n77 1 2 3 4")  # a class outside the prepared ones: left out
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    for folder, name in ((val, "sub"), (flat, "flat")):
        manifest = prepare(src, tmp_path / name, size=8, val=folder, workers=1, progress=False)
        test = np.load(tmp_path / name / "test_images.npy")
        test_labels = np.load(tmp_path / name / "test_labels.npy")
        assert manifest["splits"]["train"]["count"] == 6 and manifest["test_split"] == "val folder"
        assert test_labels.tolist() == [0, 0, 1, 1] and test[:, 0, 0, 0].tolist() == [60, 60, 160, 160]
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(ValueError, match="no class sub-folders and no labels file"):
        prepare(src, tmp_path / "nolabels", size=8, val=flat, workers=1, progress=False)
    with pytest.raises(ValueError, match="either val"):
        prepare(src, tmp_path / "both", size=8, val=val, test_fraction=0.2, workers=1, progress=False)


def test_stratified_split_is_deterministic_by_seed(tmp_path):
    src = tmp_path / "src"
    for c in range(2):
        for i in range(8):
            save(src / f"k{c}" / f"{i:02d}.png", solid(8 * i + c))
    split = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{seed}-{len(split)}"
        prepare(src, out, size=8, test_fraction=0.25, seed=seed, workers=1, progress=False)
        split[out.name] = np.load(out / "test_images.npy")[:, 0, 0, 0].tolist()
    first, repeat, other = split.values()
    assert first == repeat and first != other
    assert len(first) == 4 and sorted(v % 8 for v in first) == [0, 0, 1, 1]  # round(0.25 * 8) = 2 per class


def test_a_skipped_file_mid_class_leaves_no_hole(tmp_path):
    rng = np.random.default_rng(5)
    src, val = tmp_path / "train", tmp_path / "val"
    arrays = {}
    for name in ("x", "y"):
        for stem in ("a", "b", "c"):
            arrays[name, stem] = noise(rng, 9, 11)
            save(src / name / f"{stem}.png", arrays[name, stem])
        save(val / name / "v.png", noise(rng, 9, 9))
    (src / "x" / "b.png").write_bytes(b"\x89PNG broken")
    manifest = prepare(src, tmp_path / "out", size=8, val=val, workers=2, progress=False)
    rows = np.load(tmp_path / "out" / "train_images.npy")
    good = [src / "x" / "a.png", src / "x" / "c.png", src / "y" / "a.png", src / "y" / "b.png", src / "y" / "c.png"]
    np.testing.assert_array_equal(rows, np.stack([decode_one(p, 8) for p in good]))
    assert np.load(tmp_path / "out" / "train_labels.npy").tolist() == [0, 0, 1, 1, 1]
    assert manifest["splits"]["train"]["class_counts"] == [2, 3]
    assert manifest["splits"]["train"]["sha256_images"] == sha256sum(tmp_path / "out" / "train_images.npy")


def test_decompression_bomb_is_skipped_with_its_reason(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    for name in ("a", "b"):
        for i in range(3):
            save(src / name / f"{i}.png", noise(rng, 10, 10))
    save(src / "a" / "huge.png", noise(rng, 40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 px > 2 x 500: PIL refuses it as a bomb
    manifest = prepare(src, tmp_path / "out", size=8, val=src, workers=1, progress=False)
    assert [entry["reason"].split(":")[0] for entry in manifest["skipped"]] == ["DecompressionBombError"] * 2
    assert manifest["splits"]["train"]["class_counts"] == [3, 3]
