"""Triton segment_mean: run-length sums flushed with atomics (or ordered, atomic-free sums), gather-scale backward."""
import torch
import triton
import triton.language as tl

from fastdd.ops._checks import check_ids_in_range
from fastdd.reference import segment_mean as ref
from fastdd.triton.mean_match import _run_sums, row_counts
from fastdd.triton.ordered_sums import ordered_segment_sum_fp32


@triton.jit
def _segment_sum_kernel(x_ptr, seg_ptr, out_ptr, cnt_ptr, N, D, stride_x,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each program walks ROWS consecutive rows and flushes its fp32 sum (and row count) only when the id
    # changes, so class-sorted input (the usual case) costs one atomic per run instead of one per row.
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    _run_sums(x_ptr, seg_ptr, out_ptr, cnt_ptr, N, stride_x, row0, tl.program_id(1), D, ROWS, BLOCK_D)


@triton.jit
def _gather_scale_kernel(grad_ptr, seg_ptr, cnt_ptr, out_ptr, N, D,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < N
    mask = mask_r[:, None] & (cols[None, :] < D)
    s = tl.load(seg_ptr + rows, mask=mask_r, other=0)
    n = tl.load(cnt_ptr + s, mask=mask_r, other=1).to(tl.float32)
    inv = 1.0 / tl.maximum(n, 1.0)
    g = tl.load(grad_ptr + s[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], (g * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(D: int) -> int:
    return min(512, max(16, triton.next_power_of_2(D)))


def segment_sum_fp32(x: torch.Tensor, seg: torch.Tensor, num_segments: int, rows: int = 32):
    """(fp32 [num_segments, D] sums, int32 [num_segments] row counts) per id; ids already range-checked."""
    x = x.contiguous()
    N, D = x.shape
    out = torch.zeros(num_segments, D, dtype=torch.float32, device=x.device)
    counts = torch.zeros(num_segments, dtype=torch.int32, device=x.device)
    if N == 0 or D == 0:
        return out, row_counts(seg, num_segments)
    block_d = _block_d(D)
    grid = (triton.cdiv(N, rows), triton.cdiv(D, block_d))
    _segment_sum_kernel[grid](x, seg.contiguous(), out, counts, N, D, x.stride(0), ROWS=rows, BLOCK_D=block_d)
    return out, counts


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_segments: int, deterministic: bool = False) -> torch.Tensor:
    """``deterministic=True``: sums without atomics (ordered_sums), bit-identical from run to run."""
    if x.dtype == torch.float64:  # the kernels accumulate in fp32; float64 keeps its precision via the reference
        return ref.segment_mean(x, seg, num_segments)
    check_ids_in_range("segment_mean", "seg", seg, num_segments)
    summed = ordered_segment_sum_fp32 if deterministic else segment_sum_fp32
    sums, counts = summed(x, seg, num_segments)
    return (sums / counts.clamp_min(1)[:, None]).to(x.dtype)


def segment_mean_backward(grad: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    if grad.dtype == torch.float64:
        return ref.segment_mean_backward(grad, seg)
    num_segments, D = grad.shape
    check_ids_in_range("segment_mean_backward", "seg", seg, num_segments)
    N = seg.shape[0]
    grad = grad.contiguous()
    out = torch.empty(N, D, dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0:
        return out
    block_n, block_d = 16, _block_d(D)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _gather_scale_kernel[grid](grad, seg.contiguous(), row_counts(seg, num_segments), out, N, D,
                               BLOCK_N=block_n, BLOCK_D=block_d)
    return out
