"""Reference norm_act_pool: avgpool2x2(relu(instance_norm(x) * weight + bias)) and its analytic backward."""
import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout every implementation uses for x's kernel path and for the outputs that follow x."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_pool(op: str, pool: int) -> None:
    """The raw ops check this too (the public function's checks do not run on them)."""
    if pool != 2:
        raise ValueError(f"{op}: pool must be 2 (2x2 average pooling, stride 2), got {pool!r}")


def _stats(xf: torch.Tensor, eps: float):
    mean = xf.mean((2, 3))
    var = (xf - mean[:, :, None, None]).square().mean((2, 3))
    return mean, torch.rsqrt(var + eps)


def _affine(xf, weight, bias, mean, rstd):
    scale = rstd * weight.to(xf.dtype)
    return xf * scale[:, :, None, None] + (bias.to(xf.dtype) - mean * scale)[:, :, None, None]


def norm_act_pool(x, weight, bias, eps: float, pool: int):
    """(out, mean, rstd); built from autograd-aware torch ops, so double backward differentiates it."""
    check_pool("norm_act_pool", pool)
    xf = x.to(acc_dtype(x.dtype))
    mean, rstd = _stats(xf, eps)
    out = F.avg_pool2d(torch.relu(_affine(xf, weight, bias, mean, rstd)), pool, pool)
    return out.to(x.dtype).contiguous(memory_format=memory_format(x)), mean, rstd


def norm_act_pool_backward(grad, x, weight, bias, mean, rstd, eps: float, pool: int):
    check_pool("norm_act_pool_backward", pool)
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    N, C, H, W = x.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    y = _affine(xf, weight, bias, mean, rstd)
    up = grad.to(acc).repeat_interleave(pool, 2).repeat_interleave(pool, 3) / (pool * pool)
    dy = F.pad(up, (0, W - pool * Wo, 0, H - pool * Ho)) * (y > 0)
    xhat = (xf - mean[:, :, None, None]) * rstd[:, :, None, None]
    sum_dy = dy.sum((2, 3))
    sum_dy_xhat = (dy * xhat).sum((2, 3))
    k = (rstd * weight.to(acc))[:, :, None, None]
    dx = k * (dy - (sum_dy / (H * W))[:, :, None, None] - xhat * (sum_dy_xhat / (H * W))[:, :, None, None])
    fmt = memory_format(x)
    return (dx.to(x.dtype).contiguous(memory_format=fmt), sum_dy_xhat.sum(0).to(weight.dtype),
            sum_dy.sum(0).to(bias.dtype))
