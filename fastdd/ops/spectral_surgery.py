"""Public op fastdd.ops.spectral_surgery: per-domain gradients split by cross-domain frequency agreement."""
import torch

from fastdd.ops import _registry
from fastdd.reference import spectral_surgery as ref
from fastdd.reference.spectral_surgery import check_mask_args, check_spectra

if _registry.triton_available():
    from fastdd.triton import spectral_surgery as tri
else:  # pragma: no cover - triton is a test dependency
    tri = None

OP = "spectral_surgery"
_FFT_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.bfloat16, torch.float16)

_registry.define(
    "agreement_mask",
    "(Tensor spectra, float tau, float? gamma, float eps, bool return_agreement) -> (Tensor, Tensor)",
    cpu_reference=ref.agreement_mask, cuda_triton=tri and tri.agreement_mask)


@torch.library.register_fake("fastdd::agreement_mask")
def _(spectra, tau, gamma, eps, return_agreement):
    check_spectra("agreement_mask", spectra)
    check_mask_args("agreement_mask", tau, gamma, eps)
    a = spectra.new_empty(spectra.shape[1:-1]) if return_agreement else spectra.new_empty((0,))
    return spectra.new_empty(spectra.shape[1:]), a


def _setup_context(ctx, inputs, output):
    pass


def _refuse_backward(ctx, grad_masked, grad_a):
    raise RuntimeError(
        "spectral_surgery acts on gradients and is not differentiable: its hard mask is piecewise constant and "
        "its output is meant as an update direction, not a function to backpropagate through. Call it on "
        "detached gradients (e.g. grads.detach(), or torch.autograd.grad without create_graph=True).")


torch.library.register_autograd("fastdd::agreement_mask", _refuse_backward, setup_context=_setup_context)


def _check(grads, tau, gamma, eps):
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{OP}: grads must be a Tensor, got {type(grads).__name__}")
    if grads.dtype not in _FFT_DTYPES + _UPCAST_DTYPES:
        raise TypeError(f"{OP}: grads must be a real floating-point tensor (float32, float64, bfloat16 or "
                        f"float16), got {grads.dtype}")
    if grads.dim() != 5:
        raise ValueError(f"{OP}: grads must be 5-D [D, N, C, H, W], got shape {tuple(grads.shape)}")
    if grads.shape[0] < 2:
        raise ValueError(f"{OP}: grads needs D >= 2 domains along dim 0, got D={grads.shape[0]}")
    check_mask_args(OP, tau, gamma, eps)


def _domain_mean(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return x.mean(0)
    # Slice adds: on CPU x.mean(0) takes a slow outer-dim reduction path (3-4x slower at these shapes).
    acc = x[0] + x[1]
    for d in range(2, x.shape[0]):
        acc += x[d]
    return acc.mul_(1.0 / x.shape[0])


def spectral_surgery(grads: torch.Tensor, tau: float = 0.5, gamma: float | None = None, eps: float = 1e-12,
                     return_agreement: bool = False):
    """Split D per-domain gradients ``grads [D, N, C, H, W]`` by per-frequency cross-domain agreement.

    With ``G_d = rfft2(grads[d])`` over (H, W), each bin gets the agreement
    ``a = |sum_d G_d| / (sum_d |G_d| + eps)`` in [0, 1] (0 where both sums vanish) and the mask
    ``m = 1[a >= tau]`` (hard, ``gamma=None``; a bin with ``a == tau`` is kept) or ``a ** gamma`` (soft). ``a`` is
    computed with correctly rounded sqrt and division, no FMA contraction and one summation order in the C++ and
    Triton kernels, so for the same spectra the hard mask is bit-identical on CPU and GPU, ties included. Returns
    ``(shared, specific)`` with ``shared = irfft2(m * mean_d G_d)`` and ``specific = mean_d grads - shared``,
    both ``[N, C, H, W]`` in ``grads.dtype``; with ``return_agreement=True`` also ``a [N, C, H, W//2+1]``.

    All D·N·C images go through ONE batched rfft2 and only the masked mean takes an irfft2; the agreement,
    mask and domain mean are one fused pass (C++ on CPU, Triton on CUDA). bfloat16/float16 inputs are
    transformed in float32. Not differentiable: it acts on gradients, and backpropagating through it raises
    a RuntimeError instead of returning wrong gradients.
    """
    _check(grads, tau, gamma, eps)
    H, W = grads.shape[-2], grads.shape[-1]
    x = grads if grads.dtype in _FFT_DTYPES else grads.float()
    if grads.numel() == 0:  # MKL refuses empty transforms
        out = (grads.new_zeros(grads.shape[1:]), grads.new_zeros(grads.shape[1:]))
        return out + (grads.new_zeros(grads.shape[1:-1] + (W // 2 + 1,)),) if return_agreement else out
    spectra = torch.view_as_real(torch.fft.rfft2(x))
    masked, a = torch.ops.fastdd.agreement_mask(spectra, float(tau), None if gamma is None else float(gamma),
                                                float(eps), return_agreement)
    shared = torch.fft.irfft2(torch.view_as_complex(masked), s=(H, W))
    specific = _domain_mean(x).sub_(shared)
    out = (shared.to(grads.dtype), specific.to(grads.dtype))
    return out + (a.to(grads.dtype),) if return_agreement else out
