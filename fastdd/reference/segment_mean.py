"""Reference segment_mean: per-segment row means via index_add_ and bincount (empty segments give zeros)."""
import torch


def check_ids_in_range(*args, **kwargs):
    from fastdd.ops import _checks  # imported lazily: fastdd.ops imports this module while registering
    return _checks.check_ids_in_range(*args, **kwargs)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    check_ids_in_range("segment_mean", "seg", seg, num_segments)
    acc = torch.zeros(num_segments, x.shape[1], dtype=_acc_dtype(x.dtype), device=x.device)
    acc.index_add_(0, seg, x.to(acc.dtype))
    counts = torch.bincount(seg, minlength=num_segments).clamp_min(1).to(acc.dtype)
    return (acc / counts[:, None]).to(x.dtype)


def segment_mean_backward(grad: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    num_segments = grad.shape[0]
    check_ids_in_range("segment_mean_backward", "seg", seg, num_segments)
    acc_dtype = _acc_dtype(grad.dtype)
    inv = 1.0 / torch.bincount(seg, minlength=num_segments).clamp_min(1).to(acc_dtype)
    return (grad.to(acc_dtype)[seg] * inv[seg, None]).to(grad.dtype)
