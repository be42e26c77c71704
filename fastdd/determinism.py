"""Deterministic mode: torch's deterministic algorithms plus fastdd ops routed away from non-reproducible kernels."""
import contextlib
import os
import warnings

import torch

CUBLAS_WORKSPACE = ":4096:8"

# (op, device type) whose default implementation is not bit-reproducible. Deterministic mode serves them on CUDA with
# an atomic-free Triton variant (fastdd.triton.ordered_sums; float64 with the reference under torch's deterministic
# algorithms) and on CPU with the pure-torch reference (index_add_ adds rows in index order at any thread count).
# Every other op/device pair already reduces in a fixed order: segment_mean_backward (gather-scale; int32 atomic
# counts are exact), kmeans_assign (per-row argmin; its centroid gradient's index_add is deterministic under torch's
# flag), cvar (topk and a sum), norm_act_pool fwd/bwd (one program or task per (n, c) plane, dw/db by torch sums),
# agreement_mask (per-bin, fixed domain order). CPU spectral_surgery: torch's MKL irfft2 rounds differently at
# different thread counts (run to run it is identical).
NONDETERMINISTIC = {
    ("segment_mean", "cuda"): "the Triton kernel flushes fp32 partial sums with tl.atomic_add",
    ("mean_match", "cuda"): "the Triton kernel flushes fp32 partial sums with tl.atomic_add",
    ("mean_match_backward", "cuda"): "with real_to_syn the Triton kernel accumulates the synthetic-gradient table "
                                     "with tl.atomic_add",
    ("segment_mean", "cpu"): "the C++ kernel sums rows in min(4·threads, ...) groups: the order follows the "
                             "thread count",
    ("mean_match", "cpu"): "the C++ kernel hands row blocks to threads dynamically: the order varies run to run "
                           "with more than one thread",
}

_state = {"on": False}


def is_deterministic() -> bool:
    return _state["on"]


def needs_deterministic_path(op: str, device_type: str, deterministic: bool) -> bool:
    """Whether `op` on `device_type` must leave its default kernel for a bit-reproducible one."""
    return bool(deterministic) and (op, device_type) in NONDETERMINISTIC


def _set_cublas_workspace() -> None:
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn("deterministic mode: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set; cuBLAS "
                      f"handles created so far may not be reproducible. Set CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} "
                      "before the first CUDA call (or call set_deterministic(True) first).", RuntimeWarning,
                      stacklevel=3)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


def set_deterministic(flag: bool) -> None:
    """Turn deterministic mode on or off for the whole process.

    On: ``torch.use_deterministic_algorithms(True)`` (ops without a deterministic algorithm then raise), cuDNN
    deterministic with benchmarking off, ``CUBLAS_WORKSPACE_CONFIG`` set to ``:4096:8`` if unset, and the fastdd
    ops listed in ``NONDETERMINISTIC`` served by their pure-torch reference. Off: torch's deterministic
    algorithms and cuDNN's deterministic flag off, fastdd's default kernels back (cuDNN benchmarking stays off).
    """
    if not isinstance(flag, bool):
        raise ValueError(f"deterministic must be true or false, got {flag!r}")
    if flag:
        _set_cublas_workspace()
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(flag)
    torch.backends.cudnn.deterministic = flag
    _state["on"] = flag


@contextlib.contextmanager
def deterministic(flag: bool = True):
    """``set_deterministic(flag)`` for a block; restores fastdd's and torch's previous settings on exit."""
    saved = (_state["on"], torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    try:
        set_deterministic(flag)
        yield
    finally:
        on, algorithms, warn_only, cudnn_deterministic, cudnn_benchmark = saved
        _state["on"] = on
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark


@contextlib.contextmanager
def torch_deterministic_algorithms():
    """torch's deterministic algorithms for a block (index_add_ on CUDA then sorts instead of using atomics)."""
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)
