"""Reference spectral surgery: per-domain rfft2, agreement mask and masked domain mean, looping over domains."""
import math
import numbers

import torch

OP = "spectral_surgery"


def check_mask_args(op: str, tau, gamma, eps) -> None:
    """Scalar checks shared by the public op and every agreement_mask implementation."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"{op}: tau must be a number in [0, 1], got {tau!r}")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, numbers.Real)
                              or not math.isfinite(gamma) or gamma <= 0):
        raise ValueError(f"{op}: gamma must be None (hard mask) or a finite number > 0, got {gamma!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_spectra(op: str, spectra: torch.Tensor) -> None:
    """`spectra` is the real view [D, ..., 2] of D complex spectra (float32 or float64)."""
    if not isinstance(spectra, torch.Tensor):
        raise TypeError(f"{op}: spectra must be a Tensor, got {type(spectra).__name__}")
    if spectra.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: spectra must be float32 or float64 (torch.view_as_real of a complex spectrum), "
                        f"got {spectra.dtype}")
    if spectra.dim() < 2 or spectra.shape[-1] != 2:
        raise ValueError(f"{op}: spectra must have shape [D, ..., 2] (real view of complex), "
                         f"got {tuple(spectra.shape)}")
    if spectra.shape[0] < 2:
        raise ValueError(f"{op}: spectra needs D >= 2 domains along dim 0, got D={spectra.shape[0]}")


def mask_from_agreement(a: torch.Tensor, tau: float, gamma) -> torch.Tensor:
    return (a >= tau).to(a.dtype) if gamma is None else a.pow(gamma)


def agreement(total: torch.Tensor, magnitudes: torch.Tensor, eps: float) -> torch.Tensor:
    """a = |sum_d G_d| / (sum_d |G_d| + eps), clamped to [0, 1]; 0 where the denominator is 0."""
    den = magnitudes + eps
    a = total.abs() / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, a.clamp(max=1.0), torch.zeros_like(a))


def agreement_mask(spectra: torch.Tensor, tau: float, gamma, eps: float, return_agreement: bool):
    """Registered-op reference: (real view of m * mean_d G_d, a or an empty tensor)."""
    check_spectra("agreement_mask", spectra)
    check_mask_args("agreement_mask", tau, gamma, eps)
    D = spectra.shape[0]
    total, magnitudes = None, None
    for d in range(D):
        g = torch.view_as_complex(spectra[d].contiguous())
        total = g if total is None else total + g
        magnitudes = g.abs() if magnitudes is None else magnitudes + g.abs()
    a = agreement(total, magnitudes, eps)
    masked = torch.view_as_real(mask_from_agreement(a, tau, gamma) * (total / D)).contiguous()
    return masked, (a if return_agreement else spectra.new_empty((0,)))


def spectral_surgery(grads: torch.Tensor, tau: float = 0.5, gamma=None, eps: float = 1e-12,
                     return_agreement: bool = False):
    """Whole-op oracle: one rfft2 per domain, elementwise agreement, one irfft2 of the masked mean."""
    check_mask_args(OP, tau, gamma, eps)
    D, H, W = grads.shape[0], grads.shape[-2], grads.shape[-1]
    x = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
    total, magnitudes = None, None
    for d in range(D):
        g = torch.fft.rfft2(x[d])
        total = g if total is None else total + g
        magnitudes = g.abs() if magnitudes is None else magnitudes + g.abs()
    a = agreement(total, magnitudes, eps)
    shared = torch.fft.irfft2(mask_from_agreement(a, tau, gamma) * (total / D), s=(H, W))
    specific = x.mean(0) - shared
    out = (shared.to(grads.dtype), specific.to(grads.dtype))
    return out + (a.to(grads.dtype),) if return_agreement else out
