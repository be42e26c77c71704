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
    grad_batched = torch.autograd.grad(out.loss, engine.syn.images)[0]

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
