"""Deterministic mode: torch flags, CUDA/CPU routing of the atomic/thread-order kernels, bit-identical op results."""
import os
import warnings

import pytest
import torch

import fastdd.ops as ops
from fastdd import determinism
from fastdd.ops import _registry
from fastdd.ops._registry import CPP, REFERENCE, TRITON, provider_for
from fastdd.reference import mean_match as ref_mm, segment_mean as ref_sm

CPU = torch.device("cpu")
ROUTED_CUDA = ("segment_mean", "mean_match", "mean_match_backward")
UNROUTED = ("segment_mean_backward", "kmeans_assign", "norm_act_pool", "norm_act_pool_backward", "agreement_mask")


@pytest.fixture(autouse=True)
def _restore_settings():
    with determinism.deterministic(False):
        yield


def _threads(n, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def test_mode_sets_torch_flags_and_context_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    with determinism.deterministic():
        assert determinism.is_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not determinism.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark = False


def test_set_deterministic_keeps_a_user_workspace_and_turns_off(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    determinism.set_deterministic(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and torch.are_deterministic_algorithms_enabled()
    determinism.set_deterministic(False)
    assert not determinism.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_set_deterministic_rejects_non_bool_and_changes_nothing():
    with pytest.raises(ValueError, match="deterministic"):
        determinism.set_deterministic(1)
    assert not determinism.is_deterministic() and not torch.are_deterministic_algorithms_enabled()


def test_warns_when_cuda_was_initialised_without_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUBLAS_WORKSPACE_CONFIG"):
        determinism.set_deterministic(True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        determinism.set_deterministic(True)


@pytest.mark.parametrize("op", ROUTED_CUDA + UNROUTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_provider(op, dtype):
    if _registry._PROVIDERS[op]["cuda"] != TRITON:
        pytest.skip("triton is not installed: every CUDA op is the reference")
    fp64_ref = dtype == torch.float64 and _registry._PROVIDERS[op]["fp64_reference"]
    assert provider_for(op, "cuda", dtype, False) == (REFERENCE if fp64_ref else TRITON)
    assert provider_for(op, "cuda:0", dtype, True) == (REFERENCE if op in ROUTED_CUDA or fp64_ref else TRITON)


@pytest.mark.parametrize("op", ROUTED_CUDA + UNROUTED)
def test_cpu_provider(op):
    if _registry._PROVIDERS[op]["cpu"] != CPP:
        pytest.skip("the C++ extension is not built: every CPU op is the reference")
    assert provider_for(op, CPU, torch.float32, False) == CPP
    routed = op in ("segment_mean", "mean_match")
    assert provider_for(op, CPU, torch.float32, True) == (REFERENCE if routed else CPP)
    with determinism.deterministic():  # deterministic=None reads the mode
        assert provider_for(op, CPU, torch.float32) == (REFERENCE if routed else CPP)


def test_cuda_router_runs_the_reference_under_torch_deterministic_algorithms():
    calls = []

    def fake(tag):
        def run(*args):
            calls.append((tag, torch.are_deterministic_algorithms_enabled()))
            return tag
        return run

    # CPU tensors stand in for CUDA ones: ("mean_match", "cpu") is routed too, ("kmeans_assign", *) never is.
    mean_match = _registry._cuda_router("mean_match", fake("triton"), fake("reference"))
    kmeans = _registry._cuda_router("kmeans_assign", fake("triton"), fake("reference"))
    x32 = torch.zeros(2, 2)
    assert mean_match(None, x32) == "triton" and calls == [("triton", False)]
    with determinism.deterministic():
        torch.use_deterministic_algorithms(False)  # the router re-enables them around the reference
        assert mean_match(x32) == "reference" and calls[-1] == ("reference", True)
        assert not torch.are_deterministic_algorithms_enabled()
        assert kmeans(x32) == "triton"


def _segments(n, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float32) * 10 + 3
    return x, torch.randint(0, s, (n,), generator=g)


def test_segment_mean_deterministic_is_bit_identical_across_threads_and_matches_fp64():
    x, seg = _segments(60000, 7, 24, 0)
    x.requires_grad_(True)
    w = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))

    def run():
        out = ops.segment_mean(x, seg, 7)
        return out.detach(), torch.autograd.grad((out * w).sum(), x)[0]

    with determinism.deterministic():
        results = [_threads(n, run) for n in (1, 2, 4, 2)]
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
    expected = ref_sm.segment_mean(x.detach().double(), seg, 7).float()
    torch.testing.assert_close(results[0][0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][0], _threads(2, run)[0], atol=1e-5, rtol=1e-5)  # default path


@pytest.mark.parametrize("mapped", [False, True])
def test_mean_match_deterministic_is_bit_identical_across_runs_and_threads(mapped):
    real, real_seg = _segments(400000, 4, 32, 2)
    syn, syn_seg = _segments(40, 4, 32, 3)
    syn.requires_grad_(True)
    real_to_syn = torch.tensor([1, 1, 0, 3]) if mapped else None

    def run():
        loss, diff = ops.mean_match(real, real_seg, syn, syn_seg, 4, real_to_syn, return_diff=True)
        return loss.detach(), diff.detach(), torch.autograd.grad(loss.sum(), syn)[0]

    with determinism.deterministic():
        first = _threads(1, run)
        others = [_threads(n, run) for n in (4, 4, 4, 2, 2)]
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    syn64 = syn.detach().double().requires_grad_(True)
    loss64, diff64 = ref_mm.mean_match(real.double(), real_seg, syn64, syn_seg, 4, real_to_syn)
    grad64 = torch.autograd.grad(loss64.sum(), syn64)[0]
    for got, want in zip(first, (loss64, diff64, grad64)):  # fp32 sums of 1e5 rows, in row order
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_unrouted_cpu_ops_are_bit_identical_across_runs_and_threads():
    g = torch.Generator().manual_seed(4)
    x, cents = torch.randn(20000, 32, generator=g), torch.randn(64, 32, generator=g)
    img = torch.randn(32, 16, 12, 12, generator=g, requires_grad=True)
    weight, bias = torch.randn(16, generator=g, requires_grad=True), torch.randn(16, generator=g)
    grads = torch.randn(3, 4, 8, 16, 16, generator=g)
    losses = torch.randn(64, 10, generator=g, requires_grad=True)

    def run():
        labels, dist = ops.kmeans_assign(x, cents)
        pooled = ops.norm_act_pool(img, weight, bias)
        d_img, d_w = torch.autograd.grad(pooled.square().sum(), (img, weight))
        masked = torch.ops.fastdd.agreement_mask(torch.view_as_real(torch.fft.rfft2(grads)), 0.5, None, 1e-12, True)
        tail = ops.cvar(losses, 0.25)
        d_losses = torch.autograd.grad(tail.sum(), losses)[0]
        return labels, dist, pooled.detach(), d_img, d_w, *masked, tail.detach(), d_losses

    with determinism.deterministic():
        results = [_threads(n, run) for n in (1, 2, 4, 2)]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_spectral_surgery_deterministic_across_runs_at_a_fixed_thread_count():
    # Thread count changes only the rounding of torch's CPU irfft2 (MKL), not fastdd's agreement kernel.
    grads = torch.randn(3, 4, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    with determinism.deterministic():
        first, second = (_threads(2, lambda: ops.spectral_surgery(grads, 0.5)) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_bit_identical_in_deterministic_mode(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    real = torch.randn(50000, 256, device=dev, generator=g).to(dtype)
    real_seg = torch.randint(0, 10, (50000,), device=dev, generator=g)
    syn = torch.randn(100, 256, device=dev, generator=g).to(dtype).requires_grad_(True)
    syn_seg = torch.arange(100, device=dev) % 10
    real_to_syn = torch.arange(10, device=dev).flip(0)

    def run():
        loss, diff = ops.mean_match(real, real_seg, syn, syn_seg, 10, real_to_syn, return_diff=True)
        grad = torch.autograd.grad(loss.sum(), syn)[0]
        return loss.detach(), diff.detach(), grad, ops.segment_mean(real, real_seg, 10)

    with determinism.deterministic():
        results = [run() for _ in range(3)]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    expected = ref_mm.mean_match(real.double(), real_seg, syn.detach().double(), syn_seg, 10, real_to_syn)[0]
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(results[0][0].double(), expected, **tol)
