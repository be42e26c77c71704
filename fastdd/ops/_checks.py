"""Argument checks shared by the public ops and their fake kernels (metadata only, no device sync)."""
import os

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


def debug_checks() -> bool:
    """FASTDD_DEBUG=1: value checks on accelerator tensors run on the host (one sync each) and raise ValueError."""
    return os.environ.get("FASTDD_DEBUG", "0") == "1"


def check_ids_in_range(op: str, name: str, ids: torch.Tensor, upper: int) -> None:
    """Ids must lie in [0, upper): ValueError naming `name`, without a host sync on accelerators.

    CPU tensors are checked at once (``torch._assert_async`` is synchronous there, and it reads the flag in C++,
    so no Python-level host read happens). On CUDA the check is a device-side assertion queued before the op's
    kernels (a bad id aborts the CUDA context with a device-side assert), unless FASTDD_DEBUG=1 asks for the host
    check and its ValueError.
    """
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    ok = (lo >= 0) & (hi < upper)
    message = f"{op}: {name} ids must lie in [0, {upper})"
    if ids.device.type == "cpu":
        try:
            torch._assert_async(ok, message)
            return
        except RuntimeError:
            pass
    elif not debug_checks():
        torch._assert_async(ok, message)
        return
    elif bool(ok):
        return
    raise ValueError(f"{message}, found values in [{int(lo)}, {int(hi)}]")
