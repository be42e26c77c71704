"""The command line: `python -m fastdd`, distill --help listings, presets, and one-line errors (exit code 2)."""
import dataclasses
import json
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdd.distill.datasets import dataset_names
from fastdd.distill.methods import METHODS
from fastdd.distill.methods.gm import GMArgs

REPO = Path(__file__).resolve().parents[1]


def fastdd(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastdd", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdd: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_distill_help_lists_methods_datasets_and_method_keys():
    result = fastdd("distill", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert f"methods: {', '.join(sorted(METHODS))}" in text
    assert f"datasets: {', '.join(dataset_names())}" in text
    gm_line = text[text.index("gm: distance="):]
    for f in dataclasses.fields(GMArgs):
        assert f"{f.name}={f.default!r}" in gm_line
    dasm_line = text[text.index("dasm: base='gm'"):text.index("dm: (none)")]
    assert "segments=None" in dasm_line and "n_data=500" in dasm_line and "inner_loop=100" in dasm_line
    assert "presets: default, reference" in text and "eval_epochs=300" in text


def test_module_and_script_share_main():
    import fastdd.__main__ as module_main
    from fastdd import cli
    assert module_main.main is cli.main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line():
    assert_one_line_error(fastdd("distill", "--device", "cuda", "progress=false"), "'device'", "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_one_line():
    index = torch.cuda.device_count()
    assert_one_line_error(fastdd("distill", "--device", f"cuda:{index}", "progress=false"), f"cuda:{index}",
                          f"{index} CUDA device(s)")


def test_unknown_preset_is_one_line():
    assert_one_line_error(fastdd("distill", "--preset", "paper"), "'preset'", "default, reference")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server publishing tmp_path/server as a FASTDD_MIRROR."""
    folder = tmp_path / "server"
    (folder / "mnist").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("served", [None, b"not the real file"])
def test_failed_download_is_one_line(tmp_path, mirror, served):
    folder, url = mirror
    if served is not None:
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
            (folder / "mnist" / name).write_bytes(served)
    env = {"FASTDD_MIRROR": url, "FASTDD_DATA": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1"}
    result = fastdd("distill", "--dataset", "mnist", "--out", str(tmp_path / "run"), "progress=false", env=env)
    expected = "checksum mismatch" if served else "could not download"
    assert_one_line_error(result, expected, f"{url}/mnist/train-images-idx3-ubyte.gz")
    assert not any((tmp_path / "cache" / "mnist").iterdir())


@pytest.mark.slow
def test_distill_with_preset_flag_and_tensorboard_log(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = fastdd("distill", "--preset", "reference", "--iterations", "3", "--out", str(out), "--device", "cpu",
                    "progress=false", "eval_epochs=1", "eval_num_models=1", "batch_real=8", "log=tensorboard")
    assert result.returncode == 0, result.stderr
    saved = torch.load(out / "synthetic.pt", weights_only=False)["config"]
    assert (saved["preset"], saved["iterations"], saved["eval_every"], saved["batch_real"]) == (
        "reference", 3, 2000, 8)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))


def test_evaluate_uses_the_runs_protocol_settings(tmp_path, capsys):
    from fastdd import cli
    from fastdd.data import load_dataset
    from fastdd.distill import build_config
    from fastdd.distill.artifacts import save_synthetic

    train = load_dataset("digits")
    config = build_config(overrides=["eval_epochs=2", "eval_num_models=2", "device=cpu", "progress=false"])
    index = torch.cat([torch.nonzero(train.labels == c).flatten()[:2] for c in range(10)])
    save_synthetic(str(tmp_path / "synthetic.pt"), train.normalize(train.images[index]), train.labels[index],
                   train, config.to_dict())
    assert cli.main(["evaluate", str(tmp_path), "--models", "MLP"]) == 0
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    from fastdd.evaluate import evaluate_synthetic
    expected = evaluate_synthetic(train.normalize(train.images[index]), train.labels[index],
                                  load_dataset("digits", split="test"), models="MLP", num_models=2, epochs=2)
    assert saved["MLP"]["accuracies"] == pytest.approx(expected["MLP"]["accuracies"])
    assert "MLP accuracy" in capsys.readouterr().out


def small_image_tree(root, classes=2, per_class=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            array = np.clip(rng.normal(60 + 120 * c, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(root / f"class{c}" / f"{i}.png")
    return root


TINY_RUN = ["--method", "dm", "--ipc", "1", "--iterations", "2", "--device", "cpu", "progress=false",
            "eval_epochs=1", "eval_num_models=1"]


def test_prepare_then_distill_on_prepared_imagefolder_and_npz(tmp_path, monkeypatch, capsys):
    from fastdd import cli
    src = small_image_tree(tmp_path / "src")
    out = tmp_path / "prepared"
    assert cli.main(["prepare", str(src), str(out), "--size", "16", "--workers", "1", "--no-progress",
                     "--test-fraction", "0.34"]) == 0
    assert "prepared 2 classes at 16 px" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert cli.main(["distill", "--dataset", "prepared", "--data-dir", str(out), "--out", str(tmp_path / "r1"),
                     *TINY_RUN]) == 0
    saved = torch.load(tmp_path / "r1" / "synthetic.pt", weights_only=False)
    assert tuple(saved["images"].shape) == (2, 3, 16, 16)
    assert list(saved["dataset"]["mean"]) == pytest.approx(manifest["mean"], abs=1e-7)

    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "cache"))
    for run in ("r2", "r3"):
        assert cli.main(["distill", "--dataset", "imagefolder", "--data-dir", str(src), "--out", str(tmp_path / run),
                         *TINY_RUN, "image_size=16"]) == 0
        cached = list((tmp_path / "cache" / "prepared").iterdir())
        assert len(cached) == 1 and cached[0].name.startswith("src-16px-")
        stamp = (cached[0] / "train_images.npy").stat().st_mtime_ns
        if run == "r2":
            first_stamp = stamp
    assert stamp == first_stamp  # the second run reused the cache
    assert json.loads((cached[0] / "manifest.json").read_text())["splits"]["train"]["count"] == 10

    images = np.stack([np.full((12, 12, 3), 40 * (i % 3), dtype=np.uint8) for i in range(30)])
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(30) % 3)
    assert cli.main(["distill", "--dataset", "npz", "--data-dir", str(tmp_path / "set.npz"),
                     "--out", str(tmp_path / "r4"), *TINY_RUN]) == 0
    saved = torch.load(tmp_path / "r4" / "synthetic.pt", weights_only=False)
    assert tuple(saved["images"].shape) == (3, 3, 12, 12)


def test_file_dataset_and_prepare_errors_are_one_line(tmp_path):
    assert_one_line_error(fastdd("distill", "--dataset", "prepared", "progress=false"), "'data_dir'", "--data-dir")
    assert_one_line_error(fastdd("distill", "--dataset", "prepared", "--data-dir", str(tmp_path), "progress=false"),
                          f"{tmp_path} is not a prepared folder")
    (tmp_path / "flat").mkdir()
    assert_one_line_error(fastdd("prepare", str(tmp_path / "flat"), str(tmp_path / "out"), "--no-progress"),
                          "no class sub-folders")
    assert not (tmp_path / "out").exists()


def test_imagefolder_with_train_and_val_subfolders_tests_on_val(tmp_path, monkeypatch):
    from fastdd.distill import build_config
    from fastdd.distill.datasets import load_run_data
    small_image_tree(tmp_path / "root" / "train", per_class=4)
    small_image_tree(tmp_path / "root" / "val", per_class=2)
    monkeypatch.setenv("FASTDD_DATA", str(tmp_path / "cache"))
    config = build_config({"dataset": "imagefolder", "data_dir": str(tmp_path / "root")},
                          ["image_size=12", "progress=false", "device=cpu"])
    train, test, _ = load_run_data(config)
    assert (len(train), len(test), train.image_size, train.class_names) == (8, 4, (12, 12), ["class0", "class1"])
    with pytest.raises(ValueError, match="'image_size' is 16 but .* was prepared at 12 px"):
        cached = next((tmp_path / "cache" / "prepared").iterdir())
        load_run_data(build_config({"dataset": "prepared", "data_dir": str(cached)}, ["image_size=16"]))
