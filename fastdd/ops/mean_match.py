"""Public op fastdd.ops.mean_match: per-segment ‖mean(real) − mean(syn)‖² (the DM loss), with its backward."""
import functools

import torch

from fastdd.ops import _registry
from fastdd.ops._checks import check_count, check_floating, check_ids, check_same_device
from fastdd.reference import mean_match as ref

if _registry.triton_available():
    from fastdd.triton import mean_match as tri
else:  # pragma: no cover - triton is a test dependency
    tri = None

_registry.define(
    "mean_match",
    "(Tensor real, Tensor real_seg, Tensor syn, Tensor syn_seg, int num_segments, Tensor? real_to_syn) "
    "-> (Tensor, Tensor)",
    cpu_reference=ref.mean_match, cuda_triton=tri and tri.mean_match, triton_fp64_reference=True,
    cuda_triton_deterministic=tri and functools.partial(tri.mean_match, deterministic=True))
_registry.define(
    "mean_match_backward",
    "(Tensor? grad, Tensor diff, Tensor? grad_diff, Tensor real_seg, Tensor syn_seg, Tensor? real_to_syn, "
    "bool real_grad, bool syn_grad, ScalarType dtype) -> (Tensor, Tensor)",
    cpu_reference=ref.mean_match_backward, cuda_triton=tri and tri.mean_match_backward, triton_fp64_reference=True,
    cuda_triton_deterministic=tri and functools.partial(tri.mean_match_backward, deterministic=True))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(real, real_seg, syn, syn_seg, num_segments, real_to_syn):
    op = "mean_match"
    check_floating(op, "real", real, ndim=2)
    check_floating(op, "syn", syn, ndim=2)
    if syn.dtype != real.dtype:
        raise TypeError(f"{op}: syn must have real's dtype {real.dtype}, got {syn.dtype}")
    if syn.shape[1] != real.shape[1]:
        raise ValueError(f"{op}: syn has {syn.shape[1]} features per row but real has {real.shape[1]}")
    check_ids(op, "real_seg", real_seg, length=real.shape[0], length_of="real")
    check_ids(op, "syn_seg", syn_seg, length=syn.shape[0], length_of="syn")
    check_count(op, "num_segments", num_segments)
    tensors = dict(real=real, real_seg=real_seg, syn=syn, syn_seg=syn_seg)
    if real_to_syn is not None:
        check_ids(op, "real_to_syn", real_to_syn)
        if real_to_syn.shape[0] != num_segments:
            raise ValueError(f"{op}: real_to_syn has {real_to_syn.shape[0]} entries but num_segments is "
                             f"{num_segments}")
        tensors["real_to_syn"] = real_to_syn
    check_same_device(op, **tensors)


@torch.library.register_fake("fastdd::mean_match")
def _(real, real_seg, syn, syn_seg, num_segments, real_to_syn):
    _check(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    return (real.new_empty((num_segments,)),
            real.new_empty((num_segments, real.shape[1]), dtype=_acc_dtype(real.dtype)))


@torch.library.register_fake("fastdd::mean_match_backward")
def _(grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad, syn_grad, dtype):
    D = diff.shape[1]
    return (diff.new_empty((real_seg.shape[0] if real_grad else 0, D), dtype=dtype),
            diff.new_empty((syn_seg.shape[0] if syn_grad else 0, D), dtype=dtype))


def _setup_context(ctx, inputs, output):
    real, real_seg, syn, syn_seg, _, real_to_syn = inputs
    ctx.save_for_backward(output[1], real_seg, syn_seg, real_to_syn)
    ctx.dtype = real.dtype
    ctx.set_materialize_grads(False)


def _mean_match_grad(ctx, grad, grad_diff):
    diff, real_seg, syn_seg, real_to_syn = ctx.saved_tensors
    real_grad, syn_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if (grad is None and grad_diff is None) or not (real_grad or syn_grad):
        return None, None, None, None, None, None
    grad_real, grad_syn = torch.ops.fastdd.mean_match_backward(
        grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad, syn_grad, ctx.dtype)
    return grad_real if real_grad else None, None, grad_syn if syn_grad else None, None, None, None


def _backward_setup_context(ctx, inputs, output):
    grad, diff, grad_diff, real_seg, syn_seg, real_to_syn, real_grad, syn_grad, dtype = inputs
    ctx.save_for_backward(grad, diff, real_seg, syn_seg, real_to_syn)
    ctx.has_grad_diff = grad_diff is not None
    ctx.grad_dtype = None if grad is None else grad.dtype
    ctx.flags = (real_grad, syn_grad, dtype)
    ctx.set_materialize_grads(False)


def _mean_match_backward_grad(ctx, a_real, a_syn):
    # The backward is linear in h = 2·grad·diff + grad_diff, and its adjoint applied to the cotangents
    # (a_real, a_syn) is the forward's own diff output: p = valid·(mean a_real − mean a_syn∘real_to_syn).
    grad, diff, real_seg, syn_seg, real_to_syn = ctx.saved_tensors
    real_grad, syn_grad, dtype = ctx.flags
    S, D = diff.shape
    if a_real is None or not real_grad:
        a_real = diff.new_zeros((real_seg.shape[0], D), dtype=dtype)
    if a_syn is None or not syn_grad:
        a_syn = diff.new_zeros((syn_seg.shape[0], D), dtype=dtype)
    p = torch.ops.fastdd.mean_match(a_real, real_seg, a_syn, syn_seg, S, real_to_syn)[1]
    d_grad = d_diff = None
    if grad is not None:
        if ctx.needs_input_grad[0]:
            d_grad = (2.0 * (p * diff).sum(1)).to(ctx.grad_dtype)
        if ctx.needs_input_grad[1]:
            d_diff = 2.0 * grad.to(p.dtype)[:, None] * p
    d_grad_diff = p if ctx.has_grad_diff and ctx.needs_input_grad[2] else None
    return d_grad, d_diff, d_grad_diff, None, None, None, None, None, None


torch.library.register_autograd("fastdd::mean_match", _mean_match_grad, setup_context=_setup_context)
torch.library.register_autograd("fastdd::mean_match_backward", _mean_match_backward_grad,
                                setup_context=_backward_setup_context)


def mean_match(real: torch.Tensor, real_seg: torch.Tensor, syn: torch.Tensor, syn_seg: torch.Tensor,
               num_segments: int, real_to_syn: torch.Tensor | None = None, *, return_diff: bool = False):
    """Per-segment DM loss ``loss[s] = ‖mean(real[real_seg == s]) − mean(syn[syn_seg == real_to_syn[s]])‖²``.

    ``real [Nr, D]`` and ``syn [Ns, D]`` share one floating dtype; ``real_seg [Nr]`` and ``syn_seg [Ns]``
    are int64 ids in ``[0, num_segments)``. ``real_to_syn`` (int64 ``[num_segments]``, values in
    ``[0, num_segments)``) maps each real segment to the synthetic segment it is compared with, so real
    segments may be finer than synthetic ones (class × cluster, class × domain); ``None`` is the identity.
    The squared difference is summed over D (unnormalised); DM's loss is ``mean_match(...).sum()``.

    Returns ``[num_segments]`` in the input dtype (fp32 accumulation for half types). A segment whose real
    rows or whose matched synthetic rows are empty gives zero loss and sends zero gradient. Differentiable
    w.r.t. ``syn`` and ``real`` (twice); real's gradient is computed only when it requires grad.
    ``return_diff=True`` returns ``(loss, diff)`` with ``diff [S, D] = μ_real − μ_syn∘real_to_syn`` (0 for a
    segment with an empty side) in the accumulation dtype (fp32 for half types). In deterministic mode
    (fastdd.determinism) it is bit-reproducible: an atomic-free Triton kernel serves CUDA tensors, the
    pure-torch reference CPU ones.
    """
    _check(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    if not isinstance(return_diff, bool):
        raise ValueError(f"mean_match: return_diff must be True or False, got {return_diff!r}")
    if _registry.bypasses_dispatcher("mean_match", real.device, real.dtype):  # deterministic mode on CPU
        out = ref.mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    else:
        out = torch.ops.fastdd.mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn)
    return out if return_diff else out[0]
