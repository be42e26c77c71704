"""Matching losses used by the methods: the fused mean_match op (or its segment_mean fallback)."""
import torch

from fastdd.ops import segment_mean

try:
    from fastdd.ops.mean_match import mean_match as _fused_mean_match
except ImportError:  # the fused op lands separately; segment_mean composes the same loss
    _fused_mean_match = None


def mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn=None) -> torch.Tensor:
    """loss[s] = ‖mean(real rows of s) − mean(syn rows of real_to_syn[s])‖² (empty segments: 0)."""
    if _fused_mean_match is not None:
        return _fused_mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    num_syn = int(syn_seg.max()) + 1 if syn_seg.numel() else 0
    if real_to_syn is None:
        real_to_syn, num_syn = torch.arange(num_segments, device=real.device), num_segments
    mu_real = segment_mean(real.float(), real_seg, num_segments)
    mu_syn = segment_mean(syn.float(), syn_seg, max(num_syn, int(real_to_syn.max()) + 1))[real_to_syn]
    present = (torch.bincount(real_seg, minlength=num_segments) > 0) & (
        torch.bincount(syn_seg, minlength=mu_syn.shape[0] if num_syn else 1)[real_to_syn] > 0)
    return ((mu_real - mu_syn).square().sum(1) * present).to(syn.dtype)
