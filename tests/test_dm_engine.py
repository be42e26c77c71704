"""DM engine: faithfulness to the per-class reference loop, config errors, artifacts, resume bit-identity."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdd.reference.dm_loop import reference_dm_loss, reference_dm_loss_batchnorm
from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.methods.dm import DM

FAST = ["device=cpu", "progress=false", "eval_epochs=5", "eval_num_models=1", "batch_real=16"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", split="test")


def _engine(digits, *overrides, out=None):
    cfg = build_config(overrides=[*FAST, *overrides])
    return Distiller(cfg, digits[0], digits[1], out_dir=out)


def _batched_and_reference(digits, model, strategy, *device):
    """(batched loss, its image gradient, reference-loop loss, its image gradient) for one fixed draw."""
    engine = _engine(digits, *device, f"model={model}", f"dsa_strategy={strategy}", "ipc=3")
    net = engine.new_network()
    index, seg = engine.sample_real_index(12)
    draw = engine.draw_augmentation()
    engine.new_network = lambda *a, **k: net
    engine.sample_real_index = lambda *a, **k: (index, seg)
    engine.draw_augmentation = lambda: draw

    out = DM().compute(engine, 0)
    grad_batched = out.grad  # the chunk-accumulated image gradient

    real = engine.real_images(index)
    real_by_class = [real[seg == c] for c in range(engine.num_classes)]
    # BN nets: main_DM.py itself runs all classes in one forward pass (batch statistics over every class).
    reference = reference_dm_loss_batchnorm if model == "ConvNetBN" else reference_dm_loss
    loss_ref = reference(net, real_by_class, engine.syn.images, 3, draw.to("cpu"))
    grad_ref = torch.autograd.grad(loss_ref, engine.syn.images)[0]
    return out.loss, grad_batched, loss_ref, grad_ref


@pytest.mark.parametrize("model,strategy", [("ConvNet", "color_crop_cutout_flip_scale_rotate"),
                                            ("ConvNetD2", "none"), ("ConvNetBN", "scale_rotate")])
def test_batched_loss_and_gradient_equal_per_class_loop(digits, model, strategy):
    loss, grad, loss_ref, grad_ref = _batched_and_reference(digits, model, strategy)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model,strategy", [("ConvNet", "color_crop_cutout_flip_scale_rotate"),
                                            ("ConvNetBN", "scale_rotate")])
def test_cuda_batched_loss_and_gradient_equal_per_class_loop(digits, model, strategy):
    loss, grad, loss_ref, grad_ref = _batched_and_reference(digits, model, strategy, "device=cuda")
    # TF32 convolutions (cuDNN's default) on both sides, different reduction orders.
    torch.testing.assert_close(loss, loss_ref, rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(grad, grad_ref, rtol=2e-2, atol=1e-4)



def test_bn_batches_classes_together(digits):
    engine = _engine(digits, "model=ConvNetBN", "dsa_strategy=none", "ipc=2", "micro_batch=7")
    net = engine.new_network()
    index, seg = engine.sample_real_index(8)
    real = engine.real_images(index)
    with torch.no_grad():
        one_pass = net.embed(real)
    torch.testing.assert_close(engine.embed_real(net, real), one_pass)


def test_micro_batches_do_not_change_instance_norm_features(digits):
    engine = _engine(digits, "micro_batch=5")
    net = engine.new_network()
    real = engine.real_images(torch.arange(23))
    with torch.no_grad():
        torch.testing.assert_close(engine.embed_real(net, real), net.embed(real), rtol=1e-5, atol=1e-6)


def test_unknown_keys_and_values_are_named():
    with pytest.raises(ValueError, match="unknown config key.*'bogus'"):
        Distiller(build_config(overrides=["bogus=1", "progress=false"]), load_dataset("digits"))
    with pytest.raises(ValueError, match="'init' must be one of real, noise"):
        build_config(overrides=["init=zeros"])
    with pytest.raises(ValueError, match="'ipc' must be a positive integer"):
        build_config(overrides=["ipc=0"])
    with pytest.raises(ValueError, match="unknown method 'nope'; valid methods: .*dm"):
        Distiller(build_config(overrides=["method=nope"]), load_dataset("digits"))
    with pytest.raises(ValueError, match="IPC larger than a class's size"):
        Distiller(build_config(overrides=["ipc=1000"]), load_dataset("digits"))


def test_run_writes_artifacts_and_loss_falls(digits, tmp_path):
    engine = _engine(digits, "iterations=12", "eval_every=6", "checkpoint_every=4", out=str(tmp_path))
    metrics = engine.run()
    for name in ("synthetic.pt", "metrics.json", "grid.png", "loss.png", "checkpoint.pt", "grid_000006.png"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["iteration"] for e in saved["evaluations"]] == [6, 12]
    assert saved["seconds_per_iteration"] > 0 and saved["peak_memory_mb"] > 0
    syn = torch.load(tmp_path / "synthetic.pt", weights_only=False)
    assert syn["images"].shape == (100, 1, 8, 8) and syn["dataset"]["name"] == "digits"
    assert syn["config"]["iterations"] == 12 and "fastdd_version" in syn
    assert metrics["final_loss"] is not None


def test_noise_init_and_channels_last_run(digits):
    engine = _engine(digits, "iterations=2", "init=noise", "channels_last=true")
    engine.run()
    assert torch.isfinite(engine.syn.images).all()


RUN_SCRIPT = """
import sys, torch
import fastdd.distill.artifacts as artifacts
from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
out, resume, crash, device = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
cfg = build_config(overrides=[f"device={device}", "iterations=9", "checkpoint_every=3", "progress=false", "eval_epochs=3",
                              "eval_num_models=1", "batch_real=8", "ipc=2"])
d = Distiller(cfg, load_dataset("digits"), load_dataset("digits", split="test"), out_dir=out)
if resume:
    d.load_state_dict(torch.load(out + "/checkpoint.pt", weights_only=False))
if crash == "after":
    def cb(engine, logs):
        if engine.iteration == 7:
            import os; os._exit(9)
    d.run(callback=cb)
elif crash == "during":
    real_save = artifacts.torch.save
    def dying_save(obj, f):
        if isinstance(obj, dict) and obj.get("iteration") == 6:
            f.write(b"partial bytes of a checkpoint that never finishes")
            f.flush()
            import os; os._exit(9)
        real_save(obj, f)
    artifacts.torch.save = dying_save
    d.run()
else:
    d.run()
"""


def _straight_and_resumed_images(tmp_path, crash, device):
    def run(out, resume, mode):
        return subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(out), resume, mode, device],
                              capture_output=True, text=True, timeout=600)

    straight = tmp_path / "straight"
    res = run(straight, "0", "none")
    assert res.returncode == 0, res.stderr
    killed = tmp_path / "killed"
    assert run(killed, "0", crash).returncode == 9
    state = torch.load(killed / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert state["iteration"] == (6 if crash == "after" else 3)
    res = run(killed, "1", "none")
    assert res.returncode == 0, res.stderr
    assert not [f for f in os.listdir(killed) if f.startswith(".tmp-")], "a stale temp file survived the resume"
    a = torch.load(straight / "synthetic.pt", weights_only=False, map_location="cpu")["images"]
    b = torch.load(killed / "synthetic.pt", weights_only=False, map_location="cpu")["images"]
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["after", "during"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, crash):
    a, b = _straight_and_resumed_images(tmp_path, crash, "cpu")
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("crash", ["after", "during"])
def test_killed_and_resumed_cuda_run_matches(tmp_path, crash):
    # CUDA atomics (grid_sample / conv backward) reorder sums: equal up to rounding, not bit for bit.
    a, b = _straight_and_resumed_images(tmp_path, crash, "cuda")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_benchmark_baseline_runs_the_reference_modules_not_the_fused_kernel(monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_dm_iteration as bench
    import fastdd.models.convnet as convnet

    def fused_kernel(*args, **kwargs):
        raise AssertionError("the baseline must not run fastdd's fused norm_act_pool")
    monkeypatch.setattr(convnet, "norm_act_pool", fused_kernel)
    train, _ = bench.load_case_data("random", 3, 16)
    syn = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loop = bench.ReferenceLoop(train, syn, ipc=2, batch_real=4, device="cpu")
    loss = loop.step()
    assert loss > 0 and not torch.equal(loop.image_syn.detach(), syn)
    assert bench.step_flops(3, 32, 10, 256) == 10 * (256 + 2 * 10) * 2 * 9 * 128 * (3 * 32 * 32 + 128 * 16 * 16
                                                                                     + 128 * 8 * 8)
