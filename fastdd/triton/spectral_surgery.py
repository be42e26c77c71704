"""Triton agreement_mask: one pass over D spectra giving the agreement-masked domain-mean spectrum (and a)."""
import struct

import torch
import triton
import triton.language as tl

from fastdd.reference.spectral_surgery import check_mask_args, check_spectra


@triton.jit
def _sqrt(x):
    # IEEE-rounded in both precisions (plain tl.sqrt is approximate for fp32), so masks match the CPU kernel.
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _join(hi, mid, lo, ty: tl.constexpr):
    # float64 rebuilds the exact double from three fp32 parts; float32 takes hi, the double rounded to nearest.
    if ty == tl.float64:
        return (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, ty)


@triton.jit
def _agreement_mask_kernel(spec_ptr, out_ptr, a_ptr, M, D, stride_d, tau_hi, tau_mid, tau_lo,
                           gamma_hi, gamma_mid, gamma_lo, eps,
                           HARD: tl.constexpr, WRITE_A: tl.constexpr, BLOCK: tl.constexpr):
    # Bins are rows of a [BLOCK, 2] (re, im) tile, so loads and stores stay fully coalesced.
    # Python floats arrive as fp32: tau and gamma come split in three fp32 parts so float64 spectra see the
    # exact double (as the CPU kernel does).
    # Tie rule: `a` is computed with IEEE round-to-nearest sqrt/div only, in the CPU kernel's order, and the
    # launch disables FMA contraction, so a == tau (kept by a >= tau) resolves bit-identically on CPU and GPU.
    pid = tl.program_id(0)
    bins = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ri = tl.arange(0, 2)
    in_range = bins < M
    tile_mask = in_range[:, None] & (ri[None, :] < 2)
    offs = bins[:, None] * 2 + ri[None, :]
    acc_ty = spec_ptr.dtype.element_ty
    tau = _join(tau_hi, tau_mid, tau_lo, acc_ty)
    gamma = _join(gamma_hi, gamma_mid, gamma_lo, acc_ty)
    inv_d = _div(tl.cast(1.0, acc_ty), tl.cast(D, acc_ty))
    total = tl.zeros([BLOCK, 2], dtype=acc_ty)
    mag = tl.zeros([BLOCK], dtype=acc_ty)
    ptrs = spec_ptr + offs
    for _ in range(D):
        x = tl.load(ptrs, mask=tile_mask, other=0.0)
        total += x
        mag += _sqrt(tl.sum(x * x, axis=1))
        ptrs += stride_d
    num = _sqrt(tl.sum(total * total, axis=1))
    den = mag + tl.cast(eps, acc_ty)
    pos = den > 0
    a = tl.where(pos, tl.minimum(_div(num, tl.where(pos, den, 1.0)), 1.0), 0.0)
    if HARD:
        w = tl.where(a >= tau, inv_d, 0.0)
    else:
        safe = tl.where(a > 0, a, 1.0)
        w = tl.where(a > 0, tl.exp2(gamma * tl.log2(safe)), 0.0) * inv_d
    tl.store(out_ptr + offs, (total * w[:, None]).to(out_ptr.dtype.element_ty), mask=tile_mask)
    if WRITE_A:
        tl.store(a_ptr + bins, a.to(a_ptr.dtype.element_ty), mask=in_range)


LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # no a*b+c -> fma: the agreement must round as the CPU kernel does


def _to_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _split(value: float) -> tuple[float, float, float]:
    """Three fp32-exact parts summing exactly (in float64) to `value`; the first is fp32(value)."""
    hi = _to_fp32(float(value))
    mid = _to_fp32(float(value) - hi)
    return hi, mid, float(value) - hi - mid


def agreement_mask(spectra: torch.Tensor, tau: float, gamma, eps: float, return_agreement: bool,
                   block: int = 512):
    check_spectra("agreement_mask", spectra)
    check_mask_args("agreement_mask", tau, gamma, eps)
    spectra = spectra.contiguous()
    D = spectra.shape[0]
    out = torch.empty(spectra.shape[1:], dtype=spectra.dtype, device=spectra.device)
    a = (torch.empty(spectra.shape[1:-1], dtype=spectra.dtype, device=spectra.device) if return_agreement
         else spectra.new_empty((0,)))
    M = out.numel() // 2
    if M == 0:
        return out, a
    grid = (triton.cdiv(M, block),)
    _agreement_mask_kernel[grid](spectra, out, a if return_agreement else out, M, D, 2 * M, *_split(tau),
                                 *_split(1.0 if gamma is None else gamma), float(eps),
                                 HARD=gamma is None, WRITE_A=return_agreement, BLOCK=block, **LAUNCH_OPTIONS)
    return out, a
