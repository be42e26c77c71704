"""Triton segment_mean: run-length segment sums flushed with atomics, then a gather-scale backward."""
import torch
import triton
import triton.language as tl

from fastdd.ops._checks import check_ids_in_range


@triton.jit
def _segment_sum_kernel(x_ptr, seg_ptr, out_ptr, N, D, stride_x,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each program walks ROWS consecutive rows and flushes its fp32 sum only when the id changes,
    # so class-sorted input (the usual case) costs one atomic per run instead of one per row.
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row0 = pid_r * ROWS
    current = tl.load(seg_ptr + row0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(ROWS):
        i = row0 + r
        if i < N:
            s = tl.load(seg_ptr + i)
            if s != current:
                tl.atomic_add(out_ptr + current * D + offs_d, acc, mask=mask_d)
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                current = s
            acc += tl.load(x_ptr + i * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + current * D + offs_d, acc, mask=mask_d)


@triton.jit
def _gather_scale_kernel(grad_ptr, seg_ptr, inv_ptr, out_ptr, N, D,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < N
    mask = mask_r[:, None] & (cols[None, :] < D)
    s = tl.load(seg_ptr + rows, mask=mask_r, other=0)
    inv = tl.load(inv_ptr + s, mask=mask_r, other=0.0)
    g = tl.load(grad_ptr + s[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], (g * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(D: int) -> int:
    return min(512, max(16, triton.next_power_of_2(D)))


def segment_sum_fp32(x: torch.Tensor, seg: torch.Tensor, num_segments: int, rows: int = 32) -> torch.Tensor:
    """fp32 [num_segments, D] sums of the rows of x per id (ids already range-checked)."""
    x = x.contiguous()
    N, D = x.shape
    out = torch.zeros(num_segments, D, dtype=torch.float32, device=x.device)
    if N == 0 or D == 0:
        return out
    block_d = _block_d(D)
    grid = (triton.cdiv(N, rows), triton.cdiv(D, block_d))
    _segment_sum_kernel[grid](x, seg.contiguous(), out, N, D, x.stride(0), ROWS=rows, BLOCK_D=block_d)
    return out


def inverse_counts(seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    return 1.0 / torch.bincount(seg, minlength=num_segments).clamp_min(1).to(torch.float32)


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    check_ids_in_range("segment_mean", "seg", seg, num_segments)
    sums = segment_sum_fp32(x, seg, num_segments)
    return (sums * inverse_counts(seg, num_segments)[:, None]).to(x.dtype)


def segment_mean_backward(grad: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    num_segments, D = grad.shape
    check_ids_in_range("segment_mean_backward", "seg", seg, num_segments)
    N = seg.shape[0]
    grad = grad.contiguous()
    out = torch.empty(N, D, dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0:
        return out
    block_n, block_d = 16, _block_d(D)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _gather_scale_kernel[grid](grad, seg.contiguous(), inverse_counts(seg, num_segments), out, N, D,
                               BLOCK_N=block_n, BLOCK_D=block_d)
    return out
