"""Triton per-segment row sums without atomics: rows stably sorted by id, one program per segment sums them in order."""
import torch
import triton
import triton.language as tl


@triton.jit
def _ordered_segment_sum_kernel(x_ptr, order_ptr, offsets_ptr, out_ptr, D, stride_x,
                                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (s, column block) alone owns out[s, block]: it reads segment s's rows in their sorted order, in
    # BLOCK_R-row tiles reduced by a fixed tree, so every run adds the same numbers in the same order.
    s = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask_r = r < end
        rows = tl.load(order_ptr + r, mask=mask_r, other=0)
        tile = tl.load(x_ptr + rows[:, None] * stride_x + offs_d[None, :],
                       mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(out_ptr + s * D + offs_d, acc, mask=mask_d)


def _block_d(D: int) -> int:
    return min(256, max(16, triton.next_power_of_2(D)))


def ordered_segment_sum_fp32(x: torch.Tensor, seg: torch.Tensor, num_segments: int, out: torch.Tensor | None = None,
                             block_rows: int = 32):
    """(fp32 [num_segments, D] sums, int64 [num_segments] row counts), bit-reproducible: no atomics.

    Ids must already be range-checked. ``out`` (fp32 ``[num_segments, D]``, contiguous) receives the sums in place.
    The stable sort and searchsorted that order the rows are deterministic torch ops and make no host sync.
    """
    if x.stride(1) != 1:
        x = x.contiguous()
    N, D = x.shape
    sorted_seg, order = torch.sort(seg, stable=True)
    bounds = torch.arange(num_segments + 1, dtype=seg.dtype, device=seg.device)
    offsets = torch.searchsorted(sorted_seg, bounds)
    if out is None:
        out = torch.empty(num_segments, D, dtype=torch.float32, device=x.device)
    if num_segments and D:
        block_d = _block_d(D)
        _ordered_segment_sum_kernel[(num_segments, triton.cdiv(D, block_d))](
            x, order, offsets, out, D, x.stride(0), BLOCK_R=block_rows, BLOCK_D=block_d)
    return out, offsets.diff()
