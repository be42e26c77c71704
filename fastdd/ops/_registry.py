"""Defines each fastdd op schema once and picks its CPU and CUDA implementations (C++ > Triton > reference)."""
import importlib.util
import os

import torch

from fastdd import _ext, determinism

_ext.load()  # C++ kernels register before any schema is defined; the dispatcher accepts that order.
LIB = torch.library.Library("fastdd", "DEF")
IMPLEMENTATIONS: dict = {}
REFERENCE, CPP, TRITON, TRITON_DETERMINISTIC = "reference", "C++", "Triton", "Triton (deterministic)"
_DESCRIPTIONS = {REFERENCE: "reference (pure torch)", TRITON_DETERMINISTIC: "Triton, atomic-free (float64: reference)"}
_PROVIDERS: dict = {}  # op -> {"cpu": provider, "cuda": provider, "fp64_reference": bool, "deterministic": bool}


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
           triton_fp64_reference=False, cuda_triton_deterministic=None):
    """Define `fastdd::name` and register implementations the extension did not provide.

    ``triton_fp64_reference``: the Triton launcher hands float64 tensors to the reference (its kernels accumulate
    in fp32); recorded so `fastdd.info` says which code serves them. ``cuda_triton_deterministic``: an atomic-free
    Triton variant that serves CUDA tensors in deterministic mode (without one, the reference does).
    """
    qualname = f"fastdd::{name}"
    LIB.define(f"{name}{schema}", tags=tags)
    chosen = {}
    providers = {"fp64_reference": triton_fp64_reference, "deterministic": False}
    if _has_kernel(qualname, "CPU"):
        chosen["cpu"], providers["cpu"] = "C++ (fastdd._C)", CPP
    else:
        LIB.impl(name, cpu_reference, "CPU")
        chosen["cpu"], providers["cpu"] = "reference (pure torch)", REFERENCE
    if _has_kernel(qualname, "CUDA"):
        chosen["cuda"], providers["cuda"] = "CUDA C++ (fastdd._C)", CPP
    elif cuda_triton is not None and triton_available():
        LIB.impl(name, _cuda_router(name, cuda_triton, cuda_triton_deterministic, cuda_reference or cpu_reference),
                 "CUDA")
        chosen["cuda"] = "Triton (float64: reference)" if triton_fp64_reference else "Triton"
        providers["cuda"], providers["deterministic"] = TRITON, cuda_triton_deterministic is not None
    else:
        LIB.impl(name, cuda_reference or cpu_reference, "CUDA")
        chosen["cuda"], providers["cuda"] = "reference (pure torch)", REFERENCE
    _PROVIDERS[name] = providers
    for device_type in ("cpu", "cuda"):
        if determinism.needs_deterministic_path(name, device_type, True):
            provider = provider_for(name, device_type, torch.float32, True)
            chosen[f"{device_type} (deterministic mode)"] = _DESCRIPTIONS.get(provider, provider)
    IMPLEMENTATIONS[name] = chosen
    return getattr(torch.ops.fastdd, name)


def provider_for(name: str, device, dtype: torch.dtype, deterministic: bool | None = None) -> str:
    """Which code serves op `name` for tensors of `dtype` on `device`: REFERENCE, CPP, TRITON or TRITON_DETERMINISTIC.

    ``deterministic=None`` reads fastdd.determinism's current mode. Pure: it launches nothing, so the CUDA routing
    can be checked on a machine without a GPU.
    """
    device_type = torch.device(device).type
    if deterministic is None:
        deterministic = determinism.is_deterministic()
    providers = _PROVIDERS[name]
    chosen = providers.get(device_type, REFERENCE)
    if chosen == TRITON and dtype == torch.float64 and providers["fp64_reference"]:
        return REFERENCE
    if determinism.needs_deterministic_path(name, device_type, deterministic):
        return TRITON_DETERMINISTIC if chosen == TRITON and providers["deterministic"] else REFERENCE
    return chosen


def bypasses_dispatcher(name: str, device, dtype: torch.dtype) -> bool:
    """The public function must call the reference itself: the dispatcher would run a C++ kernel it cannot skip."""
    device_type = torch.device(device).type
    return _PROVIDERS[name].get(device_type) == CPP and provider_for(name, device, dtype) == REFERENCE


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _cuda_router(name: str, triton_impl, deterministic_impl, reference_impl):
    """The CUDA kernel of `name`: the Triton kernel, its atomic-free variant or the reference, as provider_for says."""
    def run(*args):
        t = _first_tensor(args)
        provider = provider_for(name, t.device, t.dtype)
        if provider == TRITON:
            return triton_impl(*args)
        if provider == TRITON_DETERMINISTIC:
            return deterministic_impl(*args)
        if not determinism.is_deterministic():  # float64: the Triton kernels accumulate in fp32
            return reference_impl(*args)
        with determinism.torch_deterministic_algorithms():
            return reference_impl(*args)
    run.__name__ = f"{name}_cuda"
    return run
