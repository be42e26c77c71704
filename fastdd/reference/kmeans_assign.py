"""Reference kmeans_assign: argmin of ||c||^2 - 2 x.c (per segment when seg is given), exact ||x - c||^2."""
from typing import Optional

import torch


def check_ids_in_range(*args, **kwargs):
    from fastdd.ops import _checks  # imported lazily: fastdd.ops imports this module while registering
    return _checks.check_ids_in_range(*args, **kwargs)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nearest(x: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    scores = torch.addmm((cents * cents).sum(1), x, cents.t(), beta=1, alpha=-2)
    return scores.argmin(1)


def _nearest_in_segment(x: torch.Tensor, cents: torch.Tensor, seg: torch.Tensor, chunk: int = 1 << 22):
    """Per-row argmin over its own segment's k centroids: scores against all S*k, then a gather (no host sync)."""
    S, k, _ = cents.shape
    flat = cents.reshape(S * k, -1)
    norms = (flat * flat).sum(1)
    rows = max(1, chunk // max(S * k, 1))
    labels = []
    for i in range(0, x.shape[0], rows):
        scores = torch.addmm(norms, x[i:i + rows], flat.t(), beta=1, alpha=-2).view(-1, S, k)
        own = scores.gather(1, seg[i:i + rows, None, None].expand(-1, 1, k)).squeeze(1)
        labels.append(own.argmin(1))
    return torch.cat(labels)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, seg: Optional[torch.Tensor] = None):
    """Returns (sqdist, labels), the raw op's output order."""
    acc = _acc_dtype(x.dtype)
    xs = x.to(acc)
    N = x.shape[0]
    labels = torch.empty(N, dtype=torch.int64, device=x.device)
    if N == 0:
        return x.new_empty(0), labels
    if centroids.shape[-2] == 0:
        raise ValueError(f"kmeans_assign: centroids must hold at least one centroid per segment, "
                         f"got shape {tuple(centroids.shape)}")
    cents = centroids.to(acc)
    if seg is None:
        labels = _nearest(xs, cents)
        chosen = cents[labels]
    else:
        check_ids_in_range("kmeans_assign", "seg", seg, centroids.shape[0])
        labels = _nearest_in_segment(xs, cents, seg)
        chosen = cents[seg, labels]
    sqdist = (xs - chosen).square().sum(1)
    return sqdist.to(x.dtype), labels
