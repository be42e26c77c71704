"""Ahead-of-time compiles every Triton kernel launch the ops make, for sm_80 and sm_90, without a GPU.

The interpreter accepts code a GPU compiler rejects (non-constexpr tl.arange bounds, mismatched shapes, ...).
A subprocess without TRITON_INTERPRET runs every op launcher over the dtype / constexpr / option variants the ops
use, with each kernel's ``run`` replaced by a recorder, then compiles each distinct launch with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32), options=...)``.
"""
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

TARGETS = ((80, 32), (90, 32))
INEXACT_PTX = r"\b(?:fma|mad)\.[\w.]*f(?:16|32|64)\b|\b(?:div|sqrt|rcp|rsqrt|ex2|lg2)\.(?:approx|full)[\w.]*"
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _exercise_launchers() -> None:
    """Calls every Triton launcher over the variants the public ops reach on CUDA (outputs are not used)."""
    import fastdd.ops  # noqa: F401  (registers the ops first; fastdd.triton modules import fastdd.ops)
    from fastdd.triton import kmeans_assign, mean_match, norm_act_pool, segment_mean, spectral_surgery
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([0, 0, 1, 2, 2, 1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(6, 5, generator=g).to(dtype)
        for deterministic in (False, True):  # True: the atomic-free variants of deterministic mode
            segment_mean.segment_mean(x, seg, 3, deterministic=deterministic)
            for real_to_syn in (None, torch.tensor([0, 0, 2])):
                loss, diff = mean_match.mean_match(x, seg, x[:4], seg[:4], 3, real_to_syn, deterministic=deterministic)
                for grad, grad_diff in ((loss, None), (None, diff), (loss, diff)):
                    for real_grad, syn_grad in ((True, True), (False, True)):
                        mean_match.mean_match_backward(grad, diff, grad_diff, seg, seg[:4], real_to_syn, real_grad,
                                                       syn_grad, dtype, deterministic=deterministic)
        segment_mean.segment_mean_backward(torch.randn(3, 5).to(dtype), seg)
        kmeans_assign.kmeans_assign(x, torch.randn(4, 5).to(dtype))
        kmeans_assign.kmeans_assign(x, torch.randn(3, 2, 5).to(dtype), seg)
    for dtype in (torch.float32, torch.float64):
        spectra = torch.randn(3, 2, 4, 3, 2, generator=g, dtype=dtype)
        for gamma in (None, 2.0):
            for return_agreement in (False, True):
                spectral_surgery.agreement_mask(spectra, 0.5, gamma, 1e-12, return_agreement)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 3, 6, 6, generator=g).to(dtype).contiguous(memory_format=fmt)
            w, b = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
            out, mean, rstd = norm_act_pool.norm_act_pool(x, w, b, 1e-5, 2)
            norm_act_pool.norm_act_pool_backward(torch.randn_like(out), x, w, b, mean, rstd, 1e-5, 2)


def compile_all() -> int:
    """Records every launch, compiles each distinct one for every target; returns the number compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    launches = {}

    def record(self, *args, grid=None, warmup=False, **kwargs):
        names = [p.name for p in self.params]
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for p in self.params:
            value = bound.arguments[p.name]
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            else:
                signature[p.name] = _type_of(value)
        key = (self.fn.__module__, self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
               tuple(sorted(options.items())))
        launches[key] = (self, signature, constexprs, options)

    JITFunction.run = record
    _exercise_launchers()
    failures = []
    for (module, name, *_), (fn, signature, constexprs, options) in sorted(launches.items(), key=str):
        for cc, warp in TARGETS:
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, warp),
                                        options=dict(options))
            except Exception as err:  # every failure is reported, not just the first
                failures.append(f"{module}.{name} sm_{cc} {constexprs} {signature}: {type(err).__name__}: "
                                f"{str(err)[:600]}")
                continue
            if name == "_agreement_mask_kernel" and constexprs["HARD"]:
                # The hard mask's tie rule needs IEEE-rounded arithmetic only: no fused or approximate ops.
                inexact = sorted(set(re.findall(INEXACT_PTX, kernel.asm["ptx"])))
                if inexact:
                    failures.append(f"{module}.{name} sm_{cc} {signature['spec_ptr']}: inexact PTX {inexact}")
    if failures:
        raise SystemExit("AOT compile failures:\n" + "\n".join(failures))
    kernels = sorted({f"{m}.{n}" for m, n, *_ in launches})
    print(f"compiled {len(launches)} launch variants x {len(TARGETS)} targets; kernels: {', '.join(kernels)}")
    return len(launches)


@pytest.mark.slow
def test_every_triton_launch_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; fusion on is Triton's default
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    every = {"_segment_sum_kernel", "_gather_scale_kernel", "_sums_kernel", "_finalize_kernel", "_count_kernel",
             "_syn_table_kernel", "_row_grad_kernel", "_assign_kernel", "_agreement_mask_kernel", "_fwd_kernel",
             "_bwd_kernel", "_ordered_segment_sum_kernel"}
    compiled = {k.rsplit(".", 1)[1] for k in res.stdout.split("kernels: ", 1)[1].strip().split(", ")}
    assert compiled == every


if __name__ == "__main__":
    compile_all()
