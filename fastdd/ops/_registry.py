"""Defines each fastdd op schema once and picks its CPU and CUDA implementations (C++ > Triton > reference)."""
import importlib.util
import os

import torch

from fastdd import _ext, determinism

_ext.load()  # C++ kernels register before any schema is defined; the dispatcher accepts that order.
LIB = torch.library.Library("fastdd", "DEF")
IMPLEMENTATIONS: dict = {}
REFERENCE, CPP, TRITON = "reference", "C++", "Triton"
_PROVIDERS: dict = {}  # op -> {"cpu": provider, "cuda": provider, "fp64_reference": bool}


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
    providers = {"fp64_reference": triton_fp64_reference}
    if _has_kernel(qualname, "CPU"):
        chosen["cpu"], providers["cpu"] = "C++ (fastdd._C)", CPP
    else:
        LIB.impl(name, cpu_reference, "CPU")
        chosen["cpu"], providers["cpu"] = "reference (pure torch)", REFERENCE
    if _has_kernel(qualname, "CUDA"):
        chosen["cuda"], providers["cuda"] = "CUDA C++ (fastdd._C)", CPP
    elif cuda_triton is not None and triton_available():
        LIB.impl(name, _cuda_router(name, cuda_triton, cuda_reference or cpu_reference), "CUDA")
        chosen["cuda"] = "Triton (float64: reference)" if triton_fp64_reference else "Triton"
        providers["cuda"] = TRITON
    else:
        LIB.impl(name, cuda_reference or cpu_reference, "CUDA")
        chosen["cuda"], providers["cuda"] = "reference (pure torch)", REFERENCE
    if any(op == name for op, _ in determinism.NONDETERMINISTIC):
        chosen["deterministic mode"] = "reference (pure torch, torch deterministic algorithms)"
    IMPLEMENTATIONS[name] = chosen
    _PROVIDERS[name] = providers
    return getattr(torch.ops.fastdd, name)


def provider_for(name: str, device, dtype: torch.dtype, deterministic: bool | None = None) -> str:
    """Which code serves op `name` for tensors of `dtype` on `device`: REFERENCE, CPP or TRITON.

    ``deterministic=None`` reads fastdd.determinism's current mode. Pure: it launches nothing, so the CUDA routing
    can be checked on a machine without a GPU.
    """
    device_type = torch.device(device).type
    if deterministic is None:
        deterministic = determinism.is_deterministic()
    if determinism.needs_reference(name, device_type, deterministic):
        return REFERENCE
    providers = _PROVIDERS[name]
    chosen = providers.get(device_type, REFERENCE)
    if chosen == TRITON and dtype == torch.float64 and providers["fp64_reference"]:
        return REFERENCE
    return chosen


def bypasses_dispatcher(name: str, device, dtype: torch.dtype) -> bool:
    """The public function must call the reference itself: the dispatcher would run a C++ kernel it cannot skip."""
    device_type = torch.device(device).type
    return _PROVIDERS[name].get(device_type) == CPP and provider_for(name, device, dtype) == REFERENCE


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _cuda_router(name: str, triton_impl, reference_impl):
    """The CUDA kernel of `name`: Triton, or the reference where provider_for says so (deterministic mode)."""
    def run(*args):
        t = _first_tensor(args)
        if provider_for(name, t.device, t.dtype) != REFERENCE:
            return triton_impl(*args)
        if not determinism.is_deterministic():  # float64: the Triton kernels accumulate in fp32
            return reference_impl(*args)
        with determinism.torch_deterministic_algorithms():
            return reference_impl(*args)
    run.__name__ = f"{name}_cuda"
    return run
