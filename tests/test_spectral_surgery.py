"""Tests for fastdd.ops.spectral_surgery: vs reference, SGS properties, autograd refusal, opcheck, Triton, bad input."""
import math

import pytest
import torch

from conftest import TOLERANCES, requires_cuda, triton_or_skip
from fastdd.ops import spectral_surgery
from fastdd.reference import spectral_surgery as ref

SIZES = [7, 28, 31, 32]


def _grads(D, N, C, H, W, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, N, C, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _spectra(D, shape, dtype=torch.float32, seed=0):
    return torch.view_as_real(torch.fft.rfft2(_grads(D, *shape, dtype=dtype, seed=seed)))


def _assert_outputs_close(out, expected, dtype):
    for o, e in zip(out, expected):
        assert o.dtype == e.dtype and o.shape == e.shape
        torch.testing.assert_close(o, e, **TOLERANCES[dtype])


@pytest.mark.parametrize("H", SIZES)
@pytest.mark.parametrize("W", SIZES)
@pytest.mark.parametrize("D", [2, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(H, W, D, dtype):
    grads = _grads(D, 1, 2, H, W, dtype, seed=H * 100 + W + D)
    out = spectral_surgery(grads, return_agreement=True)
    assert [t.shape for t in out] == [(1, 2, H, W), (1, 2, H, W), (1, 2, H, W // 2 + 1)]
    _assert_outputs_close(out, ref.spectral_surgery(grads, return_agreement=True), dtype)


@pytest.mark.parametrize("tau,gamma", [(0.0, None), (0.3, None), (1.0, None), (0.5, 0.5), (0.5, 2.0), (0.5, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_variants_match_reference(tau, gamma, dtype):
    grads = _grads(4, 2, 3, 9, 12, dtype, seed=7)
    out = spectral_surgery(grads, tau=tau, gamma=gamma, return_agreement=True)
    _assert_outputs_close(out, ref.spectral_surgery(grads, tau=tau, gamma=gamma, return_agreement=True), dtype)


@pytest.mark.parametrize("gamma", [None, 1.7])
@pytest.mark.parametrize("return_agreement", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_stage_matches_reference(gamma, return_agreement, dtype):
    spectra = _spectra(5, (3, 2, 17, 30), dtype)
    out = torch.ops.fastdd.agreement_mask(spectra, 0.4, gamma, 1e-12, return_agreement)
    expected = ref.agreement_mask(spectra, 0.4, gamma, 1e-12, return_agreement)
    assert out[1].shape == ((3, 2, 17, 16) if return_agreement else (0,))
    _assert_outputs_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_upcast(dtype):
    grads = _grads(3, 2, 2, 8, 8, dtype)
    out = spectral_surgery(grads, return_agreement=True)
    expected = ref.spectral_surgery(grads.float(), return_agreement=True)
    for o, e in zip(out, expected):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), e, **TOLERANCES[dtype])


def test_hand_computed_1x1():
    # With H = W = 1 the spectrum is the value itself: a = |sum| / sum |.|.
    g = torch.tensor([1.0, -3.0]).view(2, 1, 1, 1, 1)
    shared, specific, a = spectral_surgery(g, tau=0.5, return_agreement=True)
    assert a.item() == pytest.approx(0.5) and shared.item() == pytest.approx(-1.0) and specific.item() == 0
    shared, specific = spectral_surgery(g, tau=0.6)
    assert shared.item() == 0 and specific.item() == pytest.approx(-1.0)
    shared, specific = spectral_surgery(g, gamma=2.0)
    assert shared.item() == pytest.approx(-0.25) and specific.item() == pytest.approx(-0.75)
    shared, _, a = spectral_surgery(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1), tau=1.0, return_agreement=True)
    assert a.item() == 1.0 and shared.item() == pytest.approx(2.0)


@pytest.mark.parametrize("D", [2, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_gradients_are_fully_shared(D, dtype):
    g = _grads(1, 2, 3, 28, 31, dtype)
    grads = g.expand(D, -1, -1, -1, -1)
    shared, specific, a = spectral_surgery(grads, tau=0.5, return_agreement=True)
    nonzero = torch.fft.rfft2(g[0]).abs() > 1e-6
    torch.testing.assert_close(a[nonzero], torch.ones_like(a[nonzero]), **TOLERANCES[dtype])
    torch.testing.assert_close(shared, g[0], **TOLERANCES[dtype])
    torch.testing.assert_close(specific, torch.zeros_like(specific), **TOLERANCES[dtype])


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_opposite_gradients_share_nothing(gamma):
    g = _grads(1, 2, 3, 32, 7)[0]
    shared, specific, a = spectral_surgery(torch.stack([g, -g]), gamma=gamma, return_agreement=True)
    assert torch.equal(shared, torch.zeros_like(shared))
    assert a.abs().max() < 1e-6
    torch.testing.assert_close(specific, torch.zeros_like(specific))


def test_agreeing_and_conflicting_frequencies_separate():
    # A constant (DC) component shared by all domains plus one frequency on which the 3 domains
    # disagree in sign (agreement 1/3): only the constant survives the tau = 0.5 mask.
    H, W = 16, 16
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    wave = torch.cos(2 * math.pi * (3 * yy + 5 * xx) / 16).to(torch.float64)
    base = torch.full((H, W), 0.7, dtype=torch.float64)
    grads = torch.stack([base + s * wave for s in (1.0, 1.0, -1.0)]).view(3, 1, 1, H, W)
    shared, specific, a = spectral_surgery(grads, return_agreement=True)
    torch.testing.assert_close(shared[0, 0], base)
    torch.testing.assert_close(specific[0, 0], wave / 3)
    assert a[0, 0, 0, 0].item() == pytest.approx(1.0) and a[0, 0, 3, 5].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tau_zero_shares_the_domain_mean(dtype):
    grads = _grads(3, 2, 2, 31, 28, dtype)
    shared, specific = spectral_surgery(grads, tau=0.0)
    torch.testing.assert_close(shared, grads.mean(0), **TOLERANCES[dtype])
    torch.testing.assert_close(specific, torch.zeros_like(specific), **TOLERANCES[dtype])


@pytest.mark.parametrize("gamma,eps", [(None, 1e-12), (None, 0.0), (0.5, 0.0), (3.0, 1e-12)])
def test_all_zero_gradients_give_zeros_not_nan(gamma, eps):
    shared, specific, a = spectral_surgery(torch.zeros(3, 2, 1, 7, 7), gamma=gamma, eps=eps,
                                           return_agreement=True)
    for t in (shared, specific, a):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("gamma", [None, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parts_sum_to_mean_and_are_real_finite(gamma, dtype):
    grads = _grads(6, 3, 2, 28, 28, dtype) * 1e3
    shared, specific, a = spectral_surgery(grads, gamma=gamma, return_agreement=True)
    for t in (shared, specific, a):
        assert not t.is_complex() and t.dtype == dtype and torch.isfinite(t).all()
    torch.testing.assert_close(shared + specific, grads.mean(0), **TOLERANCES[dtype])
    assert a.min() >= 0 and a.max() <= 1


def test_empty_batch():
    shared, specific, a = spectral_surgery(torch.zeros(3, 0, 2, 5, 6), return_agreement=True)
    assert shared.shape == specific.shape == (0, 2, 5, 6) and a.shape == (0, 2, 5, 4)


def test_non_contiguous_input():
    grads = _grads(3, 2, 2, 12, 10).transpose(-1, -2)
    _assert_outputs_close(spectral_surgery(grads), ref.spectral_surgery(grads.contiguous()), torch.float32)


def test_backward_is_refused_clearly():
    grads = _grads(3, 1, 2, 8, 8).requires_grad_(True)
    shared, specific = spectral_surgery(grads)  # the forward itself is allowed
    with pytest.raises(RuntimeError, match="spectral_surgery acts on gradients and is not differentiable"):
        shared.sum().backward()
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(specific.sum(), grads)
    with torch.no_grad():
        assert spectral_surgery(grads)[0].grad_fn is None


@pytest.mark.parametrize("gamma,return_agreement", [(None, True), (2.0, False)])
def test_opcheck(gamma, return_agreement):
    spectra = _spectra(3, (2, 2, 7, 10))
    torch.library.opcheck(torch.ops.fastdd.agreement_mask.default, (spectra, 0.5, gamma, 1e-12, return_agreement))


def test_opcheck_requires_grad_registers_the_refusal():
    spectra = _spectra(3, (2, 2, 7, 10)).requires_grad_(True)
    args = (spectra, 0.5, None, 1e-12, True)
    torch.library.opcheck(torch.ops.fastdd.agreement_mask.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="not differentiable"):  # AOT tracing of the backward refuses too
        torch.library.opcheck(torch.ops.fastdd.agreement_mask.default, args, test_utils="test_aot_dispatch_dynamic")
    masked, a = torch.ops.fastdd.agreement_mask(*args)
    assert masked.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable"):
        masked.sum().backward()


def test_torch_compile_fullgraph():
    grads = _grads(3, 2, 2, 9, 8)

    def f(t):
        shared, specific, a = spectral_surgery(t * 2.0, tau=0.4, return_agreement=True)
        return shared + 1.0, specific, a

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    _assert_outputs_close(compiled(grads), f(grads), torch.float32)


@pytest.mark.parametrize("bad, match, exc", [
    (dict(grads=torch.ones(1, 2, 1, 4, 4)), "grads needs D >= 2", ValueError),
    (dict(grads=torch.ones(3, 1, 4, 4)), r"grads must be 5-D \[D, N, C, H, W\]", ValueError),
    (dict(grads=torch.ones(3, 2, 1, 4, 4, dtype=torch.complex64)), "grads must be a real floating-point", TypeError),
    (dict(grads=torch.ones(3, 2, 1, 4, 4, dtype=torch.int64)), "grads must be a real floating-point", TypeError),
    (dict(grads=[[1.0]]), "grads must be a Tensor", TypeError),
    (dict(tau=-0.1), r"tau must be a number in \[0, 1\]", ValueError),
    (dict(tau=1.5), r"tau must be a number in \[0, 1\]", ValueError),
    (dict(tau=float("nan")), r"tau must be a number in \[0, 1\]", ValueError),
    (dict(gamma=0.0), "gamma must be None .* > 0", ValueError),
    (dict(gamma=-1.0), "gamma must be None .* > 0", ValueError),
    (dict(eps=-1e-3), "eps must be a finite number >= 0", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = dict(grads=torch.ones(3, 2, 1, 4, 4), tau=0.5, gamma=None, eps=1e-12)
    args.update(bad)
    with pytest.raises(exc, match=match):
        spectral_surgery(**args)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("spectra, args, match, exc", [
    (torch.ones(1, 4, 2), (0.5, None, 0.0), "D >= 2", ValueError),
    (torch.ones(3, 4, 3), (0.5, None, 0.0), r"shape \[D, ..., 2\]", ValueError),
    (torch.ones(3, 4, 2, dtype=torch.int32), (0.5, None, 0.0), "float32 or float64", TypeError),
    (torch.ones(3, 4, 2), (2.0, None, 0.0), r"tau must be a number in \[0, 1\]", ValueError),
    (torch.ones(3, 4, 2), (0.5, 0.0, 0.0), "gamma must be", ValueError),
    (torch.ones(3, 4, 2), (0.5, None, -1.0), "eps must be", ValueError),
])
def test_raw_op_checks_its_arguments(impl, spectra, args, match, exc):
    fn = torch.ops.fastdd.agreement_mask if impl == "op" else ref.agreement_mask
    with pytest.raises(exc, match=match):
        fn(spectra, *args, False)


@pytest.mark.interpreter
@pytest.mark.parametrize("D,shape,gamma,dtype", [
    (2, (1, 1, 7, 4), None, torch.float32),
    (3, (1, 2, 31, 16), 0.6, torch.float32),
    (6, (2, 1, 28, 15), None, torch.float64),
    (3, (1, 1, 32, 17), 2.5, torch.float64),
])
@pytest.mark.parametrize("return_agreement", [False, True])
def test_triton_stage_under_interpreter(D, shape, gamma, dtype, return_agreement):
    triton_or_skip()
    from fastdd.triton import spectral_surgery as tri
    spectra = _spectra(D, shape[:3] + (2 * shape[3] - 2,), dtype)
    for block in (64, 512):  # several programs and a ragged last one; one program covering everything
        out = tri.agreement_mask(spectra, 0.45, gamma, 1e-12, return_agreement, block=block)
        _assert_outputs_close(out, ref.agreement_mask(spectra, 0.45, gamma, 1e-12, return_agreement), dtype)


@pytest.mark.interpreter
def test_triton_stage_zeros_under_interpreter():
    triton_or_skip()
    from fastdd.triton import spectral_surgery as tri
    spectra = torch.zeros(3, 5, 2)
    for gamma in (None, 2.0):
        masked, a = tri.agreement_mask(spectra, 0.5, gamma, 0.0, True)
        assert torch.equal(masked, spectra[0]) and torch.equal(a, torch.zeros(5))


def _tie_taus(a, count=6):
    """Agreement values of a few bins, used as tau so those bins sit exactly on the threshold."""
    flat = a.flatten()
    picks = torch.linspace(0, flat.numel() - 1, count).long()
    return [float(flat[i]) for i in picks], picks


def _assert_ties_agree(spectra, kernel_out, cpu_out, tau, pick):
    (masked, a), (masked_cpu, a_cpu) = kernel_out, cpu_out
    assert torch.equal(a.cpu(), a_cpu)  # bit-identical agreement, so a == tau compares the same way
    assert torch.equal(masked.cpu(), masked_cpu)
    total = spectra.sum(0).cpu().reshape(-1, 2)
    assert torch.equal(masked_cpu.reshape(-1, 2)[pick], total[pick] * (1.0 / spectra.shape[0]))  # a == tau: kept


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_mask_ties_resolve_identically_in_triton_and_cpu_kernel(dtype):
    triton_or_skip()
    from fastdd.triton import spectral_surgery as tri
    spectra = _spectra(3, (2, 2, 9, 8), dtype, seed=5)
    _, a = torch.ops.fastdd.agreement_mask(spectra, 0.5, None, 1e-12, True)
    for tau, pick in zip(*_tie_taus(a)):
        _assert_ties_agree(spectra, tri.agreement_mask(spectra, tau, None, 1e-12, True),
                           torch.ops.fastdd.agreement_mask(spectra, tau, None, 1e-12, True), tau, pick)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_hard_mask_ties_match_cpu_kernel_bit_for_bit(dtype):
    spectra = _spectra(4, (8, 3, 32, 31), dtype, seed=6)  # the same spectra on both devices
    _, a = torch.ops.fastdd.agreement_mask(spectra, 0.5, None, 1e-12, True)
    for tau, pick in zip(*_tie_taus(a)):
        _assert_ties_agree(spectra, torch.ops.fastdd.agreement_mask(spectra.cuda(), tau, None, 1e-12, True),
                           torch.ops.fastdd.agreement_mask(spectra, tau, None, 1e-12, True), tau, pick)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("gamma", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(gamma, dtype):
    grads = _grads(5, 8, 3, 32, 31, dtype, device="cuda")
    spectra = torch.view_as_real(torch.fft.rfft2(grads))
    out = torch.ops.fastdd.agreement_mask(spectra, 0.5, gamma, 1e-12, True)
    expected = ref.agreement_mask(spectra, 0.5, gamma, 1e-12, True)  # same cuFFT spectra: masks agree
    _assert_outputs_close(out, expected, dtype)
    shared, specific, a = spectral_surgery(grads, gamma=gamma, return_agreement=True)
    torch.testing.assert_close(a, expected[1], **TOLERANCES[dtype])
    torch.testing.assert_close(shared + specific, grads.mean(0), **TOLERANCES[dtype])
    assert torch.isfinite(shared).all() and torch.isfinite(specific).all()
