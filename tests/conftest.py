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


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Raw-launcher tests hand CPU tensors to the kernels, which only the interpreter runs. On a GPU machine they are
# skipped: there the same launchers run compiled, on CUDA tensors, in each op's CUDA tests.
NOT_INTERPRETING = ("raw Triton launchers on CPU tensors need TRITON_INTERPRET=1 (set by conftest only without a "
                    "GPU); with a GPU the kernels are tested compiled, on CUDA tensors, by the cuda-marked tests")


def triton_or_skip():
    triton = pytest.importorskip("triton", reason="triton is not installed")
    if not INTERPRETING:
        pytest.skip(NOT_INTERPRETING)
    return triton


def pytest_collection_modifyitems(config, items):
    if INTERPRETING:
        return
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NOT_INTERPRETING))


@pytest.fixture
def mnist_t10k_dir():
    if not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"shared MNIST test files not found under {MNIST_T10K} (set FASTDD_SHARED)")
    return MNIST_T10K
