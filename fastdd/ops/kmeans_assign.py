"""Public op fastdd.ops.kmeans_assign: fused nearest-centroid search (optionally per segment) + squared distance."""
from typing import Optional

import torch

from fastdd.ops import _registry
from fastdd.ops._checks import check_floating, check_ids, check_same_device
from fastdd.reference import kmeans_assign as ref

if _registry.triton_available():
    from fastdd.triton import kmeans_assign as tri
else:  # pragma: no cover - triton is a test dependency
    tri = None

# The raw op returns (sqdist, labels): float output first, since opcheck's autograd test sums the outputs in order
# into one accumulator. The public function returns (labels, sqdist).
_registry.define(
    "kmeans_assign", "(Tensor x, Tensor centroids, Tensor? seg=None) -> (Tensor, Tensor)",
    cpu_reference=ref.kmeans_assign, cuda_triton=tri and tri.kmeans_assign, triton_fp64_reference=True)


def _check(x, centroids, seg):
    op = "kmeans_assign"
    check_floating(op, "x", x, ndim=2)
    check_floating(op, "centroids", centroids)
    if seg is None:
        if centroids.dim() != 2:
            raise ValueError(f"{op}: centroids must be 2-D [K, D] (3-D [S, k, D] only with seg), "
                             f"got shape {tuple(centroids.shape)}")
    else:
        check_ids(op, "seg", seg, length=x.shape[0], length_of="x")
        if centroids.dim() != 3:
            raise ValueError(f"{op}: centroids must be 3-D [S, k, D] when seg is given, "
                             f"got shape {tuple(centroids.shape)}")
    if centroids.shape[-1] != x.shape[1]:
        raise ValueError(f"{op}: centroids have {centroids.shape[-1]} features but x has {x.shape[1]}")
    if centroids.dtype != x.dtype:
        raise TypeError(f"{op}: centroids dtype {centroids.dtype} differs from x dtype {x.dtype}")
    check_same_device(op, x=x, centroids=centroids, **({} if seg is None else {"seg": seg}))


@torch.library.register_fake("fastdd::kmeans_assign")
def _(x, centroids, seg=None):
    _check(x, centroids, seg)
    n = x.shape[0]
    return x.new_empty((n,)), x.new_empty((n,), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    x, centroids, seg = inputs
    _, labels = output
    ctx.mark_non_differentiable(labels)
    ctx.save_for_backward(x, centroids, labels, seg)
    ctx.has_seg = seg is not None


def _kmeans_assign_grad(ctx, grad_dist, grad_labels):
    # d/dx ||x - c_l||^2 = 2 (x - c_l); the centroid gets minus the sum over its rows. Plain torch ops, so this
    # backward is itself differentiable.
    x, centroids, labels, seg = ctx.saved_tensors
    k = centroids.shape[-2]
    flat = labels if not ctx.has_seg else seg * k + labels
    cents = centroids.reshape(-1, centroids.shape[-1])
    scaled = 2.0 * grad_dist.unsqueeze(1) * (x - cents.index_select(0, flat))
    grad_x = scaled if ctx.needs_input_grad[0] else None
    grad_c = None
    if ctx.needs_input_grad[1]:
        grad_c = torch.zeros_like(cents).index_add(0, flat, -scaled).view_as(centroids)
    return grad_x, grad_c, None


torch.library.register_autograd("fastdd::kmeans_assign", _kmeans_assign_grad, setup_context=_setup_context)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor,
                  seg: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x [N, D]`` and the squared Euclidean distance to it.

    * ``seg=None``: ``centroids [K, D]``; returns ``labels`` int64 ``[N]`` in ``[0, K)``.
    * ``seg`` int64 ``[N]`` in ``[0, S)`` (e.g. class ids): ``centroids [S, k, D]``; row ``i`` only considers
      ``centroids[seg[i]]`` and ``labels[i]`` is the index WITHIN its segment, in ``[0, k)``. This is exact
      per-class assignment for all classes in one call (rows need not be grouped by segment).

    ``sqdist [N]`` (x's dtype) is ``||x_i - c||^2`` recomputed exactly for the chosen centroid; the search itself uses
    ``||c||^2 - 2 x.c`` in fp32 (fp64 for fp64 inputs), so near-ties may resolve differently than an exact
    search would. Ties go to the lowest index. ``labels`` carry no gradient; ``sqdist`` is differentiable w.r.t.
    ``x`` and ``centroids`` (labels held fixed, i.e. the a.e. gradient of the min).
    """
    _check(x, centroids, seg)
    sqdist, labels = torch.ops.fastdd.kmeans_assign(x, centroids, seg)
    return labels, sqdist
