"""Shared pytest setup: Triton interpreter on GPU-less machines, shared-data paths, dtype tolerances."""
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel; CPU tensors then run through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FASTDD_SHARED", REPO.parent / "shared"))
MNIST_T10K = SHARED / "data" / "mnist-t10k"

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def triton_or_skip():
    return pytest.importorskip("triton", reason="triton is not installed")


@pytest.fixture
def mnist_t10k_dir():
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"shared MNIST test files not found under {MNIST_T10K} (set FASTDD_SHARED)")
    return MNIST_T10K
