"""Triton kmeans_assign: tiled x.c^T on tensor cores with a running argmin, then the exact ||x - c||^2 of the winner."""
import os

import torch
import triton
import triton.language as tl

from fastdd.ops._checks import check_ids_in_range
from fastdd.reference import kmeans_assign as ref


@triton.jit
def _assign_kernel(x_ptr, c_ptr, cnorm_ptr, order_ptr, block_seg_ptr, block_row_ptr, block_end_ptr,
                   labels_ptr, dist_ptr, K, D, stride_x,
                   HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each program owns BLOCK_N rows of ONE segment (rows listed by `order` when they are not grouped),
    # so all its rows share the segment's k centroids and the distance tile is a plain tl.dot.
    pid = tl.program_id(0)
    s = tl.load(block_seg_ptr + pid)
    row0 = tl.load(block_row_ptr + pid)
    row_end = tl.load(block_end_ptr + pid)
    pos = row0 + tl.arange(0, BLOCK_N)
    mask_n = pos < row_end
    if HAS_ORDER:
        rows = tl.load(order_ptr + pos, mask=mask_n, other=0)
    else:
        rows = pos
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    c_base = c_ptr + s.to(tl.int64) * K * D
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_k = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            mask_d = ds < D
            xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + ds[None, :],
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            ct = tl.load(c_base + ks[None, :] * D + ds[:, None], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:  # the interpreter's half-precision tl.dot is wrong; compute it in fp32 there
                xt = xt.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
        cn = tl.load(cnorm_ptr + s.to(tl.int64) * K + ks, mask=mask_k, other=0.0)
        score = tl.where(mask_k[None, :], cn[None, :] - 2.0 * acc, float("inf"))
        blk_min = tl.min(score, axis=1)
        blk_arg = tl.argmin(score, axis=1).to(tl.int32) + k0
        better = blk_min < best  # strict: ties keep the lowest index, as torch.argmin does
        best = tl.where(better, blk_min, best)
        best_k = tl.where(better, blk_arg, best_k)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        m = mask_n[:, None] & (ds[None, :] < D)
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + ds[None, :], mask=m, other=0.0).to(tl.float32)
        ct = tl.load(c_base + best_k.to(tl.int64)[:, None] * D + ds[None, :], mask=m, other=0.0).to(tl.float32)
        diff = xt - ct
        total += tl.sum(diff * diff, axis=1)
    tl.store(labels_ptr + rows, best_k.to(tl.int64), mask=mask_n)
    tl.store(dist_ptr + rows, total.to(dist_ptr.dtype.element_ty), mask=mask_n)


def _block_schedule(seg, num_segments: int, N: int, block_n: int):
    """Per-program (segment, first row, end row) in segment-sorted order, built on device without a sync."""
    device = seg.device
    ones = torch.ones((), dtype=torch.int64, device=device).expand(N)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=device).index_add_(0, seg, ones)
    seg_start = torch.cumsum(counts, 0) - counts
    blocks = (counts + block_n - 1) // block_n
    block_end = torch.cumsum(blocks, 0)
    max_blocks = triton.cdiv(N, block_n) + num_segments  # upper bound on sum(blocks)
    pid = torch.arange(max_blocks, device=device)
    bseg = torch.searchsorted(block_end, pid, right=True).clamp_max(num_segments - 1)
    first = block_end[bseg] - blocks[bseg]
    row0 = seg_start[bseg] + (pid - first) * block_n
    row_end = seg_start[bseg] + counts[bseg]
    row0 = torch.where(pid < block_end[-1], row0, row_end)  # surplus programs get an empty range
    return bseg, row0, row_end, max_blocks


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, seg=None, block_n: int = 64):
    if x.dtype == torch.float64:  # tl.dot has no portable fp64 path
        return ref.kmeans_assign(x, centroids, seg)
    N, D = x.shape
    S = 1 if seg is None else centroids.shape[0]
    K = centroids.shape[-2]
    labels = torch.empty(N, dtype=torch.int64, device=x.device)
    dist = torch.empty(N, dtype=x.dtype, device=x.device)
    if seg is not None:
        check_ids_in_range("kmeans_assign", "seg", seg, S)
    if N == 0:
        return dist, labels
    if K == 0:
        raise ValueError(f"kmeans_assign: centroids must hold at least one centroid per segment, "
                         f"got shape {tuple(centroids.shape)}")
    x = x.contiguous()
    cents = centroids.contiguous()
    cnorm = cents.float().square().sum(-1).contiguous()
    if seg is None:
        seg_ids = torch.zeros(1, dtype=torch.int64, device=x.device).expand(N)
        order = labels  # unused (HAS_ORDER=False)
    else:
        seg_ids, order = torch.sort(seg, stable=True)
    bseg, row0, row_end, grid = _block_schedule(seg_ids, S, N, block_n)
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    block_k = min(64, max(16, triton.next_power_of_2(K)))
    _assign_kernel[(grid,)](
        x, cents, cnorm, order, bseg, row0, row_end, labels, dist, K, D, x.stride(0),
        HAS_ORDER=seg is not None, PRECISION="tf32x3" if x.dtype == torch.float32 else "ieee",
        UPCAST=os.environ.get("TRITON_INTERPRET", "0") == "1", BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return dist, labels
