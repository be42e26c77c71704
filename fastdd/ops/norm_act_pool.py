"""Public op fastdd.ops.norm_act_pool (avgpool2x2(relu(instance_norm(x)*w+b))), its backward, and a module."""
import torch
from torch import nn

from fastdd.ops import _registry
from fastdd.ops._checks import check_floating, check_same_device
from fastdd.reference import norm_act_pool as ref

if _registry.triton_available():
    from fastdd.triton import norm_act_pool as tri
else:  # pragma: no cover - triton is a test dependency
    tri = None

_registry.define(
    "norm_act_pool", "(Tensor x, Tensor weight, Tensor bias, float eps, int pool) -> (Tensor, Tensor, Tensor)",
    cpu_reference=ref.norm_act_pool, cuda_triton=tri and tri.norm_act_pool)
_registry.define(
    "norm_act_pool_backward",
    "(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, float eps, int pool)"
    " -> (Tensor, Tensor, Tensor)",
    cpu_reference=ref.norm_act_pool_backward, cuda_triton=tri and tri.norm_act_pool_backward)

_OP = "norm_act_pool"


def _check(x, weight, bias, eps, pool):
    check_floating(_OP, "x", x, ndim=4)
    check_floating(_OP, "weight", weight, ndim=1)
    check_floating(_OP, "bias", bias, ndim=1)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape[0] != C:
            raise ValueError(f"{_OP}: {name} has {t.shape[0]} entries but x has {C} channels")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool != 2:
        raise ValueError(f"{_OP}: pool must be 2 (2x2 average pooling, stride 2), got {pool!r}")
    if not eps >= 0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps!r}")
    if x.shape[2] < pool or x.shape[3] < pool:
        raise ValueError(f"{_OP}: x must be at least {pool}x{pool} spatially, got shape {tuple(x.shape)}")
    check_same_device(_OP, x=x, weight=weight, bias=bias)


def _pooled_like(x, pool):
    N, C, H, W = x.shape
    return torch.empty((N, C, H // pool, W // pool), dtype=x.dtype, device=x.device,
                       memory_format=ref.memory_format(x))


@torch.library.register_fake("fastdd::norm_act_pool")
def _(x, weight, bias, eps, pool):
    _check(x, weight, bias, eps, pool)
    stats = x.new_empty(x.shape[:2], dtype=ref.acc_dtype(x.dtype))
    return _pooled_like(x, pool), stats, torch.empty_like(stats)


@torch.library.register_fake("fastdd::norm_act_pool_backward")
def _(grad, x, weight, bias, mean, rstd, eps, pool):
    return (torch.empty_like(x, memory_format=ref.memory_format(x)), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, pool = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.pool = eps, pool


def _norm_act_pool_grad(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastdd.norm_act_pool_backward(grad, x, weight, bias, mean, rstd, ctx.eps, ctx.pool)
    return dx, dw, db, None, None


def _backward_setup_context(ctx, inputs, output):
    grad, x, weight, bias, _mean, _rstd, eps, pool = inputs
    ctx.save_for_backward(grad, x, weight, bias)
    ctx.eps, ctx.pool = eps, pool


def _norm_act_pool_backward_grad(ctx, ggx, ggw, ggb):
    # Second order (gradient matching's create_graph) differentiates the torch reference; mean/rstd
    # get no gradient because the reference recomputes them from x.
    saved = ctx.saved_tensors
    if ggx is None and ggw is None and ggb is None:
        return (None,) * 8
    with torch.enable_grad():
        grad, x, weight, bias = leaves = [t.detach().requires_grad_(True) for t in saved]
        out = ref.norm_act_pool(x, weight, bias, ctx.eps, ctx.pool)[0]
        first = torch.autograd.grad(out, (x, weight, bias), grad, create_graph=True)
        pairs = [(f, c) for f, c in zip(first, (ggx, ggw, ggb)) if c is not None]
        found = torch.autograd.grad([f for f, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
    return (*found, None, None, None, None)


torch.library.register_autograd("fastdd::norm_act_pool", _norm_act_pool_grad, setup_context=_setup_context)
torch.library.register_autograd("fastdd::norm_act_pool_backward", _norm_act_pool_backward_grad,
                                setup_context=_backward_setup_context)


def norm_act_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                  pool: int = 2) -> torch.Tensor:
    """``avg_pool2d(relu(instance_norm(x) * weight + bias), 2, 2)`` in one pass over ``x [N, C, H, W]``.

    Instance norm is per (sample, channel) over the full H x W with biased variance, i.e.
    ``GroupNorm(C, C, affine=True)``; odd H or W drop the last row/column in the pool, as
    ``AvgPool2d(2, 2)`` does. ``weight``/``bias`` are ``[C]``. Returns ``[N, C, H // 2, W // 2]`` in x's
    dtype (fp32 statistics for half types), channels_last when x is. Differentiable w.r.t. x, weight
    and bias (twice); saves x, weight, bias and the per-(n, c) mean/rstd only when grads are needed.
    """
    _check(x, weight, bias, eps, pool)
    return torch.ops.fastdd.norm_act_pool(x, weight, bias, float(eps), pool)[0]


class FusedNormActPool(nn.Module):
    """``GroupNorm(C, C, affine=True) -> ReLU -> AvgPool2d(2, 2)`` as one op; same parameter names/init."""

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "FusedNormActPool":
        """A fused tail sharing `norm`'s parameters (it must be per-channel: num_groups == num_channels)."""
        if norm.num_groups != norm.num_channels or not norm.affine:
            raise ValueError("FusedNormActPool needs an affine GroupNorm with num_groups == num_channels")
        fused = cls(norm.num_channels, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act_pool(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
