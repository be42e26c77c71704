"""Deterministic mode: torch flags, CUDA/CPU routing of the atomic/thread-order kernels, bit-identical op results."""
import os
import warnings

import pytest
import torch

import fastdd.ops as ops
from fastdd import determinism
from fastdd.ops import _registry
from fastdd.ops._registry import CPP, REFERENCE, TRITON, TRITON_DETERMINISTIC, provider_for
from fastdd.reference import mean_match as ref_mm, segment_mean as ref_sm
from conftest import TOLERANCES, requires_cuda, triton_or_skip

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
    expected = REFERENCE if fp64_ref else TRITON_DETERMINISTIC if op in ROUTED_CUDA else TRITON
    assert provider_for(op, "cuda:0", dtype, True) == expected


@pytest.mark.parametrize("op", ROUTED_CUDA + UNROUTED)
def test_cpu_provider(op):
    if _registry._PROVIDERS[op]["cpu"] != CPP:
        pytest.skip("the C++ extension is not built: every CPU op is the reference")
    assert provider_for(op, CPU, torch.float32, False) == CPP
    routed = op in ("segment_mean", "mean_match")
    assert provider_for(op, CPU, torch.float32, True) == (REFERENCE if routed else CPP)
    with determinism.deterministic():  # deterministic=None reads the mode
        assert provider_for(op, CPU, torch.float32) == (REFERENCE if routed else CPP)


def test_cuda_router_follows_provider_for(monkeypatch):
    calls = []

    def fake(tag):
        def run(*args):
            calls.append((tag, torch.are_deterministic_algorithms_enabled()))
            return tag
        return run

    # CPU tensors stand in for CUDA ones: the router only reads provider_for, here told CPU is served as CUDA is.
    for op in ("mean_match", "kmeans_assign"):
        monkeypatch.setitem(_registry._PROVIDERS[op], "cpu", TRITON)
    mean_match = _registry._cuda_router("mean_match", fake("triton"), fake("deterministic"), fake("reference"))
    kmeans = _registry._cuda_router("kmeans_assign", fake("triton"), fake("deterministic"), fake("reference"))
    x32, x64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    assert mean_match(None, x32) == "triton" and calls == [("triton", False)]  # the first tensor decides
    assert mean_match(x64) == "reference" and calls[-1] == ("reference", False)
    with determinism.deterministic():
        assert mean_match(x32) == "deterministic" and kmeans(x32) == "triton"
        torch.use_deterministic_algorithms(False)  # the router re-enables them around the reference
        assert mean_match(x64) == "reference" and calls[-1] == ("reference", True)
        assert not torch.are_deterministic_algorithms_enabled()


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


class _Forbidden:
    """Stands in for an atomic kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("an atomic kernel was launched in deterministic mode")


def _forbid_atomic_kernels(monkeypatch):
    from fastdd.triton import mean_match as tri_mm, segment_mean as tri_sm
    for module, name in ((tri_sm, "_segment_sum_kernel"), (tri_mm, "_sums_kernel"), (tri_mm, "_syn_table_kernel")):
        monkeypatch.setattr(module, name, _Forbidden())
    return tri_mm, tri_sm


@pytest.mark.parametrize("D", [5, 300])  # 300: two column blocks
def test_ordered_segment_sum_matches_fp64_sums(D):
    triton_or_skip()
    from fastdd.triton.ordered_sums import ordered_segment_sum_fp32
    g = torch.Generator().manual_seed(6)
    seg = torch.tensor([3, 0, 3, 3] * 20 + [0, 5])  # unsorted; 1, 2 and 4 empty; segment 3 spans two row tiles
    x = torch.randn(seg.shape[0], D, generator=g)
    sums, counts = ordered_segment_sum_fp32(x, seg, 6)
    expected = torch.zeros(6, D, dtype=torch.float64).index_add_(0, seg, x.double())
    torch.testing.assert_close(sums, expected.float(), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [21, 0, 0, 60, 0, 1]
    empty, none = ordered_segment_sum_fp32(x[:0], seg[:0], 3)
    assert torch.equal(empty, torch.zeros(3, D)) and none.tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_deterministic_variants_match_the_reference_without_atomics(dtype, monkeypatch):
    triton_or_skip()
    tri_mm, tri_sm = _forbid_atomic_kernels(monkeypatch)
    g = torch.Generator().manual_seed(7)
    real_seg = torch.randint(0, 4, (90,), generator=g)
    real_seg[real_seg == 1] = 2  # real segment 1 is empty (mapped to a non-empty synthetic one below)
    syn_seg = torch.tensor([0, 1, 1, 3, 0, 3])  # segment 2 has no synthetic rows
    real, syn = torch.randn(90, 40, generator=g).to(dtype), torch.randn(6, 40, generator=g).to(dtype)
    tol = TOLERANCES[dtype]
    for _ in range(2):
        torch.testing.assert_close(tri_sm.segment_mean(real, real_seg, 4, deterministic=True),
                                   ref_sm.segment_mean(real.double(), real_seg, 4).to(dtype), **tol)
    for real_to_syn in (None, torch.tensor([1, 1, 0, 2])):
        loss, diff = tri_mm.mean_match(real, real_seg, syn, syn_seg, 4, real_to_syn, deterministic=True)
        loss64, diff64 = ref_mm.mean_match(real.double(), real_seg, syn.double(), syn_seg, 4, real_to_syn)
        torch.testing.assert_close(loss, loss64.to(dtype), **tol)
        torch.testing.assert_close(diff, diff64.float(), **tol)
        grad, grad_diff = torch.randn(4, generator=g).to(dtype), torch.randn(4, 40, generator=g)
        got = tri_mm.mean_match_backward(grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, True, True, dtype,
                                         deterministic=True)
        want = ref_mm.mean_match_backward(grad.double(), diff64, grad_diff.double(), real_seg, syn_seg, real_to_syn,
                                          True, True, torch.float64)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.to(dtype), **tol)


def test_deterministic_paths_make_no_host_sync(monkeypatch):
    triton_or_skip()
    from fastdd.sync import count_host_syncs
    tri_mm, tri_sm = _forbid_atomic_kernels(monkeypatch)
    real, real_seg = _segments(50, 3, 8, 8)
    syn, syn_seg = _segments(6, 3, 8, 9)
    syn.requires_grad_(True)
    real_to_syn = torch.tensor([2, 0, 1])
    with determinism.deterministic(), count_host_syncs(cuda=False) as syncs:
        tri_sm.segment_mean(real, real_seg, 3, deterministic=True)
        loss, diff = tri_mm.mean_match(real, real_seg, syn.detach(), syn_seg, 3, real_to_syn, deterministic=True)
        tri_mm.mean_match_backward(loss, diff, None, real_seg, syn_seg, real_to_syn, False, True, torch.float32,
                                   deterministic=True)
        loss = ops.mean_match(real, real_seg, syn, syn_seg, 3, real_to_syn) + ops.segment_mean(syn, syn_seg, 3).sum()
        loss.sum().backward()
    syncs.assert_none("deterministic mode")


@requires_cuda
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

    from fastdd.sync import count_host_syncs
    with determinism.deterministic():
        results = [run() for _ in range(2)]
        with count_host_syncs(cuda=True) as syncs:
            results.append(run())
    syncs.assert_none("deterministic mode on CUDA")
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    expected = ref_mm.mean_match(real.double(), real_seg, syn.detach().double(), syn_seg, 10, real_to_syn)[0]
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(results[0][0].double(), expected, **tol)


def test_engine_turns_the_mode_on_and_a_later_plain_engine_turns_it_off():
    from fastdd.data import from_tensors
    from fastdd.distill import Distiller, build_config
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(40) % 4)
    keys = {"device": "cpu", "progress": False, "ipc": 2, "model": "ConvNetW32"}
    try:
        Distiller(build_config({**keys, "deterministic": True}), data)
        assert determinism.is_deterministic() and torch.are_deterministic_algorithms_enabled()
        Distiller(build_config(keys), data)
        assert not determinism.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    finally:
        determinism.set_deterministic(False)


def test_engine_refuses_deterministic_cuda_runs_with_scale_or_rotate_dsa():
    from fastdd.distill import build_config
    from fastdd.distill.engine import check_deterministic
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="'deterministic'.*scale and rotate"):
        check_deterministic(build_config({"deterministic": True}), cuda)
    check_deterministic(build_config({"deterministic": True, "dsa_strategy": "color_crop_cutout_flip"}), cuda)
    check_deterministic(build_config({"deterministic": True}), torch.device("cpu"))
    check_deterministic(build_config({"deterministic": False}), cuda)
