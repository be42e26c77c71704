"""`python -m fastdd.info`: versions, extension status, Triton status and each op's CPU/CUDA implementation."""
import importlib.util
import os
import platform

import torch

import fastdd
from fastdd import _ext


def collect() -> dict:
    import fastdd.ops  # noqa: F401  (registers every op)
    from fastdd.ops._registry import IMPLEMENTATIONS, triton_available, triton_runnable

    triton_version = None
    if triton_available():
        import triton
        triton_version = triton.__version__
    status = _ext.status()
    build = status["build_info"]
    return {
        "fastdd": fastdd.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu_extension": {"compiled": importlib.util.find_spec("fastdd._C") is not None,
                          "loaded": status["loaded"], "status": status["reason"],
                          "openmp": build.get("openmp"), "threads": torch.get_num_threads()},
        "cuda_extension": {"compiled": bool(build.get("cuda")), "loaded": status["loaded"] and bool(build.get("cuda"))},
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton_can_run": triton_runnable(),
        "triton_mode": ("GPU" if torch.cuda.is_available() else
                        "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else
                        "no GPU: Triton kernels run only under TRITON_INTERPRET=1") if triton_available() else "not installed",
        "ops": {name: dict(impl) for name, impl in sorted(IMPLEMENTATIONS.items())},
    }


def format_report(info: dict) -> str:
    lines = [f"fastdd {info['fastdd']}  torch {info['torch']}  triton {info['triton'] or 'not installed'}  "
             f"python {info['python']}"]
    cpu = info["cpu_extension"]
    lines.append(f"CPU extension : compiled={cpu['compiled']} loaded={cpu['loaded']} ({cpu['status']}), "
                 f"OpenMP={cpu['openmp']}, threads={cpu['threads']}")
    if info["cuda_extension"]["compiled"]:
        lines.append(f"CUDA extension: compiled=True loaded={info['cuda_extension']['loaded']}")
    else:  # the normal case: fastdd ships no CUDA C++; every CUDA tensor goes to a Triton kernel (or the reference)
        lines.append("CUDA tensors  : Triton kernels (fastdd._C holds CPU kernels only; no CUDA extension)")
    lines.append(f"CUDA GPU      : {info['gpu'] or 'none visible'}")
    lines.append(f"Triton        : can run={info['triton_can_run']} ({info['triton_mode']})")
    lines.append("op implementations (CPU tensors | CUDA tensors):")
    width = max((len(n) for n in info["ops"]), default=0)
    for name, impl in info["ops"].items():
        lines.append(f"  {name:<{width}}  {impl['cpu']:<24} | {impl['cuda']}")
    return "\n".join(lines)


def main() -> None:
    print(format_report(collect()))


if __name__ == "__main__":
    main()
