"""Reference mean_match (the DM loss per segment): index_add_ segment means and counts, then squared differences."""
import torch

from fastdd.reference.segment_mean import row_counts


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_ids(op, num_segments, real_seg, syn_seg, real_to_syn):
    # Imported here: fastdd.ops imports this module, so a top-level import would be circular.
    from fastdd.ops._checks import check_ids_in_range
    check_ids_in_range(op, "real_seg", real_seg, num_segments)
    check_ids_in_range(op, "syn_seg", syn_seg, num_segments)
    if real_to_syn is not None:
        check_ids_in_range(op, "real_to_syn", real_to_syn, num_segments)


def _segment_sums(x, seg, num_segments, acc_dtype):
    sums = torch.zeros(num_segments, x.shape[1], dtype=acc_dtype, device=x.device).index_add_(0, seg, x.to(acc_dtype))
    return sums, row_counts(seg, num_segments, acc_dtype)


def mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn=None):
    """(loss [S] in real's dtype, diff [S, D] in the accumulation dtype): diff = μ_real − μ_syn∘real_to_syn."""
    _check_ids("mean_match", num_segments, real_seg, syn_seg, real_to_syn)
    acc = _acc_dtype(real.dtype)
    sum_r, n_r = _segment_sums(real, real_seg, num_segments, acc)
    sum_s, n_s = _segment_sums(syn, syn_seg, num_segments, acc)
    mu_r = sum_r / n_r.clamp_min(1)[:, None]
    mu_s = sum_s / n_s.clamp_min(1)[:, None]
    if real_to_syn is not None:
        mu_s, n_s = mu_s[real_to_syn], n_s[real_to_syn]
    valid = (n_r > 0) & (n_s > 0)  # an empty real or syn segment contributes nothing
    diff = torch.where(valid[:, None], mu_r - mu_s, 0.0)
    return diff.square().sum(1).to(real.dtype), diff


def mean_match_backward(grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad, syn_grad, dtype):
    """(grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in `dtype` for cotangents (grad, grad_diff)."""
    num_segments, D = diff.shape
    _check_ids("mean_match_backward", num_segments, real_seg, syn_seg, real_to_syn)
    n_r = row_counts(real_seg, num_segments, diff.dtype)
    n_s = row_counts(syn_seg, num_segments, diff.dtype)
    partner = n_s if real_to_syn is None else n_s[real_to_syn]
    valid = ((n_r > 0) & (partner > 0)).to(diff.dtype)
    h = torch.zeros_like(diff)  # per-segment cotangent of diff: 2·g·diff + grad_diff
    if grad is not None:
        h = h + 2.0 * grad.to(diff.dtype)[:, None] * diff
    if grad_diff is not None:
        h = h + grad_diff.to(diff.dtype)
    h = h * valid[:, None]
    grad_real = diff.new_empty((0, D), dtype=dtype)
    grad_syn = diff.new_empty((0, D), dtype=dtype)
    if real_grad:
        grad_real = (h / n_r.clamp_min(1)[:, None])[real_seg].to(dtype)
    if syn_grad:
        if real_to_syn is not None:
            h = torch.zeros_like(h).index_add_(0, real_to_syn, h)
        grad_syn = (h / -n_s.clamp_min(1)[:, None])[syn_seg].to(dtype)
    return grad_real, grad_syn
