"""Public op fastdd.ops.segment_mean: mean of the rows of x carrying each segment id, with backward."""
import functools

import torch

from fastdd.ops import _registry
from fastdd.ops._checks import check_count, check_floating, check_ids, check_same_device
from fastdd.reference import segment_mean as ref

if _registry.triton_available():
    from fastdd.triton import segment_mean as tri
else:  # pragma: no cover - triton is a test dependency
    tri = None

_registry.define(
    "segment_mean", "(Tensor x, Tensor seg, int num_segments) -> Tensor",
    cpu_reference=ref.segment_mean, cuda_triton=tri and tri.segment_mean, triton_fp64_reference=True,
    cuda_triton_deterministic=tri and functools.partial(tri.segment_mean, deterministic=True))
_registry.define(
    "segment_mean_backward", "(Tensor grad, Tensor seg) -> Tensor",
    cpu_reference=ref.segment_mean_backward, cuda_triton=tri and tri.segment_mean_backward, triton_fp64_reference=True)


def _check(x, seg, num_segments):
    check_floating("segment_mean", "x", x, ndim=2)
    check_ids("segment_mean", "seg", seg, length=x.shape[0], length_of="x")
    check_count("segment_mean", "num_segments", num_segments)
    check_same_device("segment_mean", x=x, seg=seg)


@torch.library.register_fake("fastdd::segment_mean")
def _(x, seg, num_segments):
    _check(x, seg, num_segments)
    return x.new_empty((num_segments, x.shape[1]))


@torch.library.register_fake("fastdd::segment_mean_backward")
def _(grad, seg):
    return grad.new_empty((seg.shape[0], grad.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _segment_mean_grad(ctx, grad):
    (seg,) = ctx.saved_tensors
    return torch.ops.fastdd.segment_mean_backward(grad, seg), None, None


def _backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_segments = inputs[0].shape[0]


def _segment_mean_backward_grad(ctx, grad):
    # The backward is linear in `grad`; its adjoint is segment_mean itself.
    (seg,) = ctx.saved_tensors
    return torch.ops.fastdd.segment_mean(grad, seg, ctx.num_segments), None


torch.library.register_autograd("fastdd::segment_mean", _segment_mean_grad, setup_context=_setup_context)
torch.library.register_autograd("fastdd::segment_mean_backward", _segment_mean_backward_grad,
                                setup_context=_backward_setup_context)


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean of the rows of ``x [N, D]`` per segment id ``seg [N]`` (int64 in ``[0, num_segments)``).

    Returns ``[num_segments, D]`` in x's dtype (fp32 accumulation for half types). An empty segment
    yields a zero row and receives zero gradient. Differentiable w.r.t. ``x`` (twice). In deterministic mode
    (fastdd.determinism) it is bit-reproducible: an atomic-free Triton kernel serves CUDA tensors, the
    pure-torch reference CPU ones.
    """
    _check(x, seg, num_segments)
    if _registry.bypasses_dispatcher("segment_mean", x.device, x.dtype):  # deterministic mode on CPU
        return ref.segment_mean(x, seg, num_segments)
    return torch.ops.fastdd.segment_mean(x, seg, num_segments)
