"""Triton mean_match: run-length (atomic) or ordered (atomic-free) segment sums, a finalize, row-gradient writes."""
import torch
import triton
import triton.language as tl

from fastdd.ops._checks import check_ids_in_range
from fastdd.reference import mean_match as ref
from fastdd.triton.ordered_sums import ordered_segment_sum_fp32


@triton.jit
def _run_sums(x_ptr, seg_ptr, out_ptr, cnt_ptr, N, stride, row0, pid_d, D,
              ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Walks ROWS rows from row0; sums and row counts are flushed with atomics only when the id changes
    # (one flush per run for class-sorted rows).
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    current = tl.load(seg_ptr + row0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    run = 0
    for r in range(ROWS):
        i = row0 + r
        if i < N:
            s = tl.load(seg_ptr + i)
            if s != current:
                tl.atomic_add(out_ptr + current * D + offs_d, acc, mask=mask_d)
                if pid_d == 0:
                    tl.atomic_add(cnt_ptr + current, run)
                acc = tl.zeros([BLOCK_D], dtype=tl.float32)
                run = 0
                current = s
            acc += tl.load(x_ptr + i.to(tl.int64) * stride + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            run += 1
    tl.atomic_add(out_ptr + current * D + offs_d, acc, mask=mask_d)
    if pid_d == 0:
        tl.atomic_add(cnt_ptr + current, run)


@triton.jit
def _sums_kernel(real_ptr, real_seg_ptr, syn_ptr, syn_seg_ptr, sums_ptr, counts_ptr, Nr, Ns, S, D,
                 stride_r, stride_s, n_real_progs, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One launch for both inputs: programs [0, n_real_progs) take real rows, the rest syn rows.
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    if pid < n_real_progs:
        _run_sums(real_ptr, real_seg_ptr, sums_ptr, counts_ptr, Nr, stride_r, pid * ROWS, pid_d, D,
                  ROWS, BLOCK_D)
    else:
        _run_sums(syn_ptr, syn_seg_ptr, sums_ptr + S * D, counts_ptr + S, Ns, stride_s,
                  (pid - n_real_progs) * ROWS, pid_d, D, ROWS, BLOCK_D)


@triton.jit
def _finalize_kernel(sums_ptr, counts_ptr, map_ptr, loss_ptr, diff_ptr, S, D,
                     HAS_MAP: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    t = s
    if HAS_MAP:
        t = tl.load(map_ptr + s)
    n_r = tl.load(counts_ptr + s).to(tl.float32)
    n_s = tl.load(counts_ptr + S + t).to(tl.float32)
    valid = (n_r > 0) & (n_s > 0)
    inv_r = tl.where(valid, 1.0 / tl.maximum(n_r, 1.0), 0.0)
    inv_s = tl.where(valid, 1.0 / tl.maximum(n_s, 1.0), 0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < D
        mu_r = tl.load(sums_ptr + s * D + offs, mask=mask, other=0.0) * inv_r
        mu_s = tl.load(sums_ptr + (S + t) * D + offs, mask=mask, other=0.0) * inv_s
        diff = mu_r - mu_s
        tl.store(diff_ptr + s * D + offs, diff, mask=mask)
        acc += diff * diff
    tl.store(loss_ptr + s, tl.sum(acc, axis=0).to(loss_ptr.dtype.element_ty))


@triton.jit
def _syn_table_kernel(grad_ptr, diff_ptr, gd_ptr, counts_ptr, map_ptr, table_ptr, S, D,
                      HAS_G: tl.constexpr, HAS_GD: tl.constexpr, BLOCK_D: tl.constexpr):
    # table[t] += valid[s]·(2·grad[s]·diff[s] + grad_diff[s]) for every real segment s mapped to t.
    s = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    t = tl.load(map_ptr + s)
    valid = (tl.load(counts_ptr + s) > 0) & (tl.load(counts_ptr + S + t) > 0)
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_G:
        g = tl.load(grad_ptr + s).to(tl.float32)
        h += 2.0 * g * tl.load(diff_ptr + s * D + offs, mask=mask, other=0.0)
    if HAS_GD:
        h += tl.load(gd_ptr + s * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(table_ptr + t * D + offs, tl.where(valid, h, 0.0), mask=mask)


@triton.jit
def _row_grad_kernel(seg_ptr, grad_ptr, tab_ptr, gd_ptr, own_cnt_ptr, part_cnt_ptr, map_ptr, out_ptr, N, D,
                     SIGN: tl.constexpr, HAS_G: tl.constexpr, HAS_GD: tl.constexpr,
                     CHECK_PARTNER: tl.constexpr, HAS_MAP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[i] = SIGN·valid/n_own·(2·grad[u]·tab[u] + gd[u]), u = seg[i]: each row's gradient written directly.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < N
    mask = mask_r[:, None] & (cols[None, :] < D)
    u = tl.load(seg_ptr + rows, mask=mask_r, other=0)
    n_own = tl.load(own_cnt_ptr + u, mask=mask_r, other=1).to(tl.float32)
    coef = SIGN / tl.maximum(n_own, 1.0)
    if CHECK_PARTNER:
        partner = u
        if HAS_MAP:
            partner = tl.load(map_ptr + u, mask=mask_r, other=0)
        n_part = tl.load(part_cnt_ptr + partner, mask=mask_r, other=1)
        coef = tl.where(n_part > 0, coef, 0.0)
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    at = u[:, None].to(tl.int64) * D + cols[None, :]
    if HAS_G:
        g = tl.load(grad_ptr + u, mask=mask_r, other=0.0).to(tl.float32)
        h += 2.0 * g[:, None] * tl.load(tab_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_GD:
        h += tl.load(gd_ptr + at, mask=mask, other=0.0).to(tl.float32)
    out = h * coef[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(D: int) -> int:
    return min(512, max(16, triton.next_power_of_2(D)))


def check_ids(op: str, num_segments: int, **ids: torch.Tensor) -> None:
    """Range-check several id tensors without a host sync (see fastdd.ops._checks.check_ids_in_range)."""
    for name, t in ids.items():
        if t is not None:
            check_ids_in_range(op, name, t, num_segments)


@triton.jit
def _count_kernel(real_seg_ptr, syn_seg_ptr, counts_ptr, Nr, Ns, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    is_real = offs < Nr
    is_syn = (offs >= Nr) & (offs < Nr + Ns)
    u = tl.load(real_seg_ptr + offs, mask=is_real, other=0)
    u = tl.where(is_syn, tl.load(syn_seg_ptr + (offs - Nr), mask=is_syn, other=0) + S, u)
    tl.atomic_add(counts_ptr + u, tl.full([BLOCK], 1, tl.int32), mask=is_real | is_syn)


def _counts(real_seg, syn_seg, num_segments, block=1024):
    """int32 [2·S]: rows per real segment, then rows per syn segment (one launch, no sync)."""
    counts = torch.zeros(2 * num_segments, dtype=torch.int32, device=real_seg.device)
    total = real_seg.shape[0] + syn_seg.shape[0]
    if total:
        _count_kernel[(triton.cdiv(total, block),)](real_seg.contiguous(), syn_seg.contiguous(), counts,
                                                    real_seg.shape[0], syn_seg.shape[0], num_segments,
                                                    BLOCK=block)
    return counts


def row_counts(seg, num_segments):
    """int32 [num_segments]: rows per id (one launch, no sync; ids already range-checked)."""
    return _counts(seg, seg[:0], num_segments)[:num_segments]


def mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn=None, rows: int = 32,
               deterministic: bool = False):
    """``deterministic=True``: segment sums without atomics (ordered_sums), bit-identical from run to run."""
    if real.dtype == torch.float64:  # Triton accumulates in fp32; float64 keeps its precision via the reference
        return ref.mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    check_ids("mean_match", num_segments, real_seg=real_seg, syn_seg=syn_seg, real_to_syn=real_to_syn)
    real, syn = real.contiguous(), syn.contiguous()
    (Nr, D), Ns, S = real.shape, syn.shape[0], num_segments
    loss = torch.zeros(S, dtype=real.dtype, device=real.device)
    diff = torch.zeros(S, D, dtype=torch.float32, device=real.device)
    if S == 0 or D == 0:
        return loss, diff
    block_d = _block_d(D)
    if deterministic:
        sums = torch.empty(2 * S, D, dtype=torch.float32, device=real.device)
        n_r = ordered_segment_sum_fp32(real, real_seg, S, out=sums[:S])[1]
        n_s = ordered_segment_sum_fp32(syn, syn_seg, S, out=sums[S:])[1]
        counts = torch.cat([n_r, n_s]).to(torch.int32)
    else:
        sums = torch.zeros(2 * S, D, dtype=torch.float32, device=real.device)
        counts = torch.zeros(2 * S, dtype=torch.int32, device=real.device)
    n_real = triton.cdiv(Nr, rows)
    grid = (n_real + triton.cdiv(Ns, rows), triton.cdiv(D, block_d))
    if grid[0] > 0 and not deterministic:
        _sums_kernel[grid](real, real_seg.contiguous(), syn, syn_seg.contiguous(), sums, counts, Nr, Ns, S, D,
                           real.stride(0), syn.stride(0), n_real, ROWS=rows, BLOCK_D=block_d)
    mapping = real_to_syn.contiguous() if real_to_syn is not None else counts
    _finalize_kernel[(S,)](sums, counts, mapping, loss, diff, S, D, HAS_MAP=real_to_syn is not None,
                           BLOCK_D=block_d)
    return loss, diff


def _syn_cotangents(grad, diff, grad_diff, counts, real_to_syn):
    """valid[s]·(2·grad[s]·diff[s] + grad_diff[s]) per real segment s, fp32 [S, D] (what _syn_table_kernel adds)."""
    S = diff.shape[0]
    h = torch.zeros_like(diff, dtype=torch.float32)
    if grad is not None:
        h += 2.0 * grad.float()[:, None] * diff
    if grad_diff is not None:
        h += grad_diff.float()
    valid = (counts[:S] > 0) & (counts[S:][real_to_syn] > 0)
    return h * valid[:, None]


def mean_match_backward(grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad, syn_grad, dtype,
                        deterministic: bool = False):
    """``deterministic=True``: the real_to_syn table is summed without atomics (ordered_sums)."""
    S, D = diff.shape
    if diff.dtype == torch.float64:
        return ref.mean_match_backward(grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad,
                                       syn_grad, dtype)
    check_ids("mean_match_backward", S, real_seg=real_seg, syn_seg=syn_seg, real_to_syn=real_to_syn)
    Nr, Ns = real_seg.shape[0], syn_seg.shape[0]
    grad_real = diff.new_empty((Nr if real_grad else 0, D), dtype=dtype)
    grad_syn = diff.new_empty((Ns if syn_grad else 0, D), dtype=dtype)
    if S == 0 or D == 0 or (grad is None and grad_diff is None):
        return grad_real.zero_(), grad_syn.zero_()
    counts = _counts(real_seg, syn_seg, S)
    diff = diff.contiguous()
    has_g, has_gd = grad is not None, grad_diff is not None
    g = grad.contiguous() if has_g else diff
    gd = grad_diff.contiguous() if has_gd else diff
    mapping = real_to_syn.contiguous() if real_to_syn is not None else counts
    block_n, block_d = 16, _block_d(D)
    if real_grad and Nr:
        _row_grad_kernel[(triton.cdiv(Nr, block_n), triton.cdiv(D, block_d))](
            real_seg.contiguous(), g, diff, gd, counts, counts[S:], mapping, grad_real, Nr, D,
            SIGN=1.0, HAS_G=has_g, HAS_GD=has_gd, CHECK_PARTNER=True, HAS_MAP=real_to_syn is not None,
            BLOCK_N=block_n, BLOCK_D=block_d)
    if syn_grad and Ns:
        grid = (triton.cdiv(Ns, block_n), triton.cdiv(D, block_d))
        if real_to_syn is None:
            _row_grad_kernel[grid](syn_seg.contiguous(), g, diff, gd, counts[S:], counts, mapping, grad_syn, Ns, D,
                                   SIGN=-1.0, HAS_G=has_g, HAS_GD=has_gd, CHECK_PARTNER=True, HAS_MAP=False,
                                   BLOCK_N=block_n, BLOCK_D=block_d)
        else:
            if deterministic:
                table = ordered_segment_sum_fp32(_syn_cotangents(grad, diff, grad_diff, counts, mapping), mapping,
                                                 S)[0]
            else:
                table = torch.zeros(S, D, dtype=torch.float32, device=diff.device)
                _syn_table_kernel[(S, triton.cdiv(D, block_d))](g, diff, gd, counts, mapping, table, S, D,
                                                                HAS_G=has_g, HAS_GD=has_gd, BLOCK_D=block_d)
            _row_grad_kernel[grid](syn_seg.contiguous(), g, diff, table, counts[S:], counts, mapping, grad_syn,
                                   Ns, D, SIGN=-1.0, HAS_G=False, HAS_GD=True, CHECK_PARTNER=False,
                                   HAS_MAP=False, BLOCK_N=block_n, BLOCK_D=block_d)
    return grad_real, grad_syn
