"""Defines each fastdd op schema once and picks its CPU and CUDA implementations (C++ > Triton > reference)."""
import importlib.util
import os

import torch

from fastdd import _ext

_ext.load()  # C++ kernels register before any schema is defined; the dispatcher accepts that order.
LIB = torch.library.Library("fastdd", "DEF")
IMPLEMENTATIONS: dict = {}


def _has_kernel(qualname: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runnable() -> bool:
    """Triton kernels can actually run: a CUDA GPU, or the interpreter on CPU tensors."""
    if not triton_available():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def define(name: str, schema: str, *, cpu_reference, cuda_triton=None, cuda_reference=None, tags=(),
           triton_fp64_reference=False):
    """Define `fastdd::name` and register implementations the extension did not provide.

    ``triton_fp64_reference``: the Triton launcher hands float64 tensors to the reference (its kernels accumulate
    in fp32); recorded so `fastdd.info` says which code serves them.
    """
    qualname = f"fastdd::{name}"
    LIB.define(f"{name}{schema}", tags=tags)
    chosen = {}
    if _has_kernel(qualname, "CPU"):
        chosen["cpu"] = "C++ (fastdd._C)"
    else:
        LIB.impl(name, cpu_reference, "CPU")
        chosen["cpu"] = "reference (pure torch)"
    if _has_kernel(qualname, "CUDA"):
        chosen["cuda"] = "CUDA C++ (fastdd._C)"
    elif cuda_triton is not None and triton_available():
        LIB.impl(name, cuda_triton, "CUDA")
        chosen["cuda"] = "Triton (float64: reference)" if triton_fp64_reference else "Triton"
    else:
        LIB.impl(name, cuda_reference or cpu_reference, "CUDA")
        chosen["cuda"] = "reference (pure torch)"
    IMPLEMENTATIONS[name] = chosen
    return getattr(torch.ops.fastdd, name)
