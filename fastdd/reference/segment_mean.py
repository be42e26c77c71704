"""Reference segment_mean: per-segment row means via index_add_ sums and counts (empty segments give zeros)."""
import torch


def check_ids_in_range(*args, **kwargs):
    from fastdd.ops import _checks  # imported lazily: fastdd.ops imports this module while registering
    return _checks.check_ids_in_range(*args, **kwargs)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_counts(seg: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows per id as `dtype` [num_segments]; index_add_ instead of bincount, which syncs on CUDA."""
    ones = torch.ones((), dtype=dtype, device=seg.device).expand(seg.shape[0])
    return torch.zeros(num_segments, dtype=dtype, device=seg.device).index_add_(0, seg, ones)


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    check_ids_in_range("segment_mean", "seg", seg, num_segments)
    acc = torch.zeros(num_segments, x.shape[1], dtype=_acc_dtype(x.dtype), device=x.device)
    acc.index_add_(0, seg, x.to(acc.dtype))
    counts = row_counts(seg, num_segments, acc.dtype).clamp_min(1)
    return (acc / counts[:, None]).to(x.dtype)


def segment_mean_backward(grad: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    num_segments = grad.shape[0]
    check_ids_in_range("segment_mean_backward", "seg", seg, num_segments)
    acc_dtype = _acc_dtype(grad.dtype)
    inv = 1.0 / row_counts(seg, num_segments, acc_dtype).clamp_min(1)
    return (grad.to(acc_dtype)[seg] * inv[seg, None]).to(grad.dtype)
