"""Triton kernels (GPU tensors; CPU tensors under TRITON_INTERPRET=1). Import only when triton is installed."""
