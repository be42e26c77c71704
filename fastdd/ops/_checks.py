"""Argument checks shared by the public ops and their fake kernels (metadata only, no device sync)."""
import torch


def check_floating(op: str, name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_ids(op: str, name: str, ids: torch.Tensor, length: int | None = None, length_of: str = "") -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64 segment ids, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(ids.shape)}")
    if length is not None and ids.shape[0] != length:
        raise ValueError(f"{op}: {name} has {ids.shape[0]} entries but {length_of} has {length} rows")


def check_count(op: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def check_ids_in_range(op: str, name: str, ids: torch.Tensor, upper: int) -> None:
    """Value check (syncs on GPU): used inside kernels' Python wrappers, never on a traced path."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        raise ValueError(f"{op}: {name} ids must lie in [0, {upper}), found values in [{lo}, {hi}]")
