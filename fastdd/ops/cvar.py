"""Public op fastdd.ops.cvar: differentiable upper-tail CVaR_alpha of K losses (exact Rockafellar-Uryasev weights)."""
import math
import numbers

import torch


def cvar_weights(K: int, alpha: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Weights of the ceil(alpha*K) largest losses, largest first: 1/(alpha K) each, the last one the remainder.

    With m = alpha*K and n = floor(m): CVaR_alpha = (sum of the n largest + (m - n) * the (n+1)-th largest) / m,
    which is min_t t + E[(L - t)+] / alpha at t = the (n+1)-th largest loss (the VaR).
    """
    m = alpha * K
    if abs(m - round(m)) <= 1e-9 * max(K, 1):  # alpha*K meant to be an integer (e.g. 0.3*10)
        m = float(round(m))
    n = math.floor(m)
    count = min(K, math.ceil(m))
    # Built on the target device (a host tensor moved there would be a synchronising copy on CUDA).
    w = torch.full((count,), 1.0 / m, dtype=dtype, device=device)
    if count > n:
        w[n:].fill_((m - n) / m)
    return w


def cvar(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR_alpha over the last dim of ``losses [..., K]``: the mean of the worst (largest) alpha-fraction.

    Exactly ``min_t t + mean((L - t)+) / alpha`` for the uniform distribution on the K values: the
    ``floor(alpha K)`` largest losses get weight ``1/(alpha K)``, the next one ``(alpha K - floor(alpha K))/(alpha K)``,
    the rest 0. ``alpha = 1`` is the mean, ``alpha <= 1/K`` the max. Differentiable: the gradient reaches the selected
    losses with those weights (ties are broken by ``torch.topk``; any choice is a valid subgradient).
    ``alpha`` must be a real number in (0, 1] (a Python number keeps the op free of host syncs; a one-element
    tensor is read with ``.item()``). Returns ``[...]`` in the losses' dtype.
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"cvar: losses must be a Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"cvar: losses must be a floating-point tensor, got {losses.dtype}")
    if losses.dim() == 0 or losses.shape[-1] == 0:
        raise ValueError(f"cvar: losses must have at least one value in the last dim, got shape {tuple(losses.shape)}")
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and not alpha.requires_grad:
        alpha = alpha.item()  # alpha fixes how many losses are kept (a shape): a tensor alpha costs one sync
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"cvar: alpha must be a real number in (0, 1], got {alpha!r}")
    K = losses.shape[-1]
    w = cvar_weights(K, float(alpha), dtype=losses.dtype, device=losses.device)
    top = losses.topk(w.shape[0], dim=-1, largest=True, sorted=True).values
    return (top * w).sum(-1)
