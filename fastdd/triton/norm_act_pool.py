"""Triton norm_act_pool: per-(sample, channel-block) stats pass, then fused normalise+ReLU+2x2 pool; backward."""
import torch
import triton
import triton.language as tl

from fastdd.reference.norm_act_pool import acc_dtype, check_pool, memory_format


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, C, H, W, Wo, HWo,
                sxn, sxc, sxh, sxw, son, soc, soh, sow, eps,
                ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    xb = x_ptr + n * sxn + offs_c[:, None] * sxc
    # Sums are shifted by each plane's first value so E[d^2] - E[d]^2 does not cancel for large means.
    shift = tl.load(x_ptr + n * sxn + offs_c * sxc, mask=mask_c, other=0.0).to(ACC)
    acc_s = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    acc_q = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    HW = H * W
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = mask_c[:, None] & (p < HW)[None, :]
        v = tl.load(xb + ((p // W) * sxh + (p % W) * sxw)[None, :], mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - shift[:, None], 0.0)
        acc_s += d
        acc_q += d * d
    mu = tl.sum(acc_s, 1) / HW
    var = tl.maximum(tl.sum(acc_q, 1) / HW - mu * mu, 0.0)
    mean = shift + mu
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + n * C + offs_c, mean, mask=mask_c)
    tl.store(rstd_ptr + n * C + offs_c, rstd, mask=mask_c)
    scale = rstd * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0)
    a = scale[:, None]
    sh = (tl.load(b_ptr + offs_c, mask=mask_c, other=0.0) - mean * scale)[:, None]
    ob = out_ptr + n * son + offs_c[:, None] * soc
    for o0 in range(0, HWo, BLOCK_P):
        o = o0 + tl.arange(0, BLOCK_P)
        m = mask_c[:, None] & (o < HWo)[None, :]
        i = o // Wo
        j = o % Wo
        p00 = xb + (2 * i * sxh + 2 * j * sxw)[None, :]
        r = tl.maximum(tl.load(p00, mask=m, other=0.0).to(ACC) * a + sh, 0.0)
        r += tl.maximum(tl.load(p00 + sxw, mask=m, other=0.0).to(ACC) * a + sh, 0.0)
        r += tl.maximum(tl.load(p00 + sxh, mask=m, other=0.0).to(ACC) * a + sh, 0.0)
        r += tl.maximum(tl.load(p00 + sxh + sxw, mask=m, other=0.0).to(ACC) * a + sh, 0.0)
        tl.store(ob + (i * soh + j * sow)[None, :], (0.25 * r).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
                C, H, W, Ho, Wo, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(rstd_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    k = rstd * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0)
    sh = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0) - mean * k
    xb = x_ptr + n * sxn + offs_c[:, None] * sxc
    gb = g_ptr + n * sgn + offs_c[:, None] * sgc
    acc_dy = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    acc_dyx = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    HWo = Ho * Wo
    for o0 in range(0, HWo, BLOCK_P):
        o = o0 + tl.arange(0, BLOCK_P)
        m = mask_c[:, None] & (o < HWo)[None, :]
        i = o // Wo
        j = o % Wo
        gq = 0.25 * tl.load(gb + (i * sgh + j * sgw)[None, :], mask=m, other=0.0).to(ACC)
        p00 = xb + (2 * i * sxh + 2 * j * sxw)[None, :]
        for q in tl.static_range(4):
            v = tl.load(p00 + (q // 2) * sxh + (q % 2) * sxw, mask=m, other=0.0).to(ACC)
            dy = tl.where(v * k[:, None] + sh[:, None] > 0.0, gq, 0.0)
            acc_dy += dy
            acc_dyx += dy * (v - mean[:, None])
    sum_dy = tl.sum(acc_dy, 1)
    sum_dyxhat = tl.sum(acc_dyx, 1) * rstd
    tl.store(db_ptr + n * C + offs_c, sum_dy, mask=mask_c)
    tl.store(dw_ptr + n * C + offs_c, sum_dyxhat, mask=mask_c)
    HW = H * W
    # dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)) = k * dy + P * x + Q
    P = -k * rstd * sum_dyxhat / HW
    Q = -k * sum_dy / HW - P * mean
    dxb = dx_ptr + n * sdn + offs_c[:, None] * sdc
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = mask_c[:, None] & (p < HW)[None, :]
        h = p // W
        w = p % W
        inpool = m & ((h // 2 < Ho) & (w // 2 < Wo))[None, :]
        v = tl.load(xb + (h * sxh + w * sxw)[None, :], mask=m, other=0.0).to(ACC)
        gq = 0.25 * tl.load(gb + ((h // 2) * sgh + (w // 2) * sgw)[None, :], mask=inpool, other=0.0).to(ACC)
        dy = tl.where(v * k[:, None] + sh[:, None] > 0.0, gq, 0.0)
        dx = k[:, None] * dy + P[:, None] * v + Q[:, None]
        tl.store(dxb + (h * sdh + w * sdw)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


def _blocks(channels_last: bool, C: int, HW: int):
    if channels_last:  # coalesce along C
        block_c = min(64, max(2, triton.next_power_of_2(C)))
        return block_c, max(2, min(2048 // block_c, triton.next_power_of_2(HW)))
    return 1, min(1024, max(16, triton.next_power_of_2(HW)))


def norm_act_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, pool: int):
    check_pool("norm_act_pool", pool)
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    N, C, H, W = x.shape
    Ho, Wo = H // pool, W // pool
    acc = acc_dtype(x.dtype)
    out = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    mean = torch.empty((N, C), dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    if N * C == 0:
        return out, mean, rstd
    block_c, block_p = _blocks(fmt == torch.channels_last, C, H * W)
    grid = (N, triton.cdiv(C, block_c))
    _fwd_kernel[grid](x, weight.to(acc).contiguous(), bias.to(acc).contiguous(), out, mean, rstd,
                      C, H, W, Wo, Ho * Wo, *x.stride(), *out.stride(), eps,
                      ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=block_c, BLOCK_P=block_p)
    return out, mean, rstd


def norm_act_pool_backward(grad, x, weight, bias, mean, rstd, eps: float, pool: int):
    check_pool("norm_act_pool_backward", pool)
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x, memory_format=fmt)
    dw = torch.zeros((N, C), dtype=acc, device=x.device)
    db = torch.zeros_like(dw)
    if N * C > 0:
        grad = grad.contiguous(memory_format=fmt)
        block_c, block_p = _blocks(fmt == torch.channels_last, C, H * W)
        grid = (N, triton.cdiv(C, block_c))
        _bwd_kernel[grid](grad, x, weight.to(acc).contiguous(), bias.to(acc).contiguous(),
                          mean.to(acc).contiguous(), rstd.to(acc).contiguous(), dx, dw, db,
                          C, H, W, grad.shape[2], grad.shape[3], *grad.stride(), *x.stride(), *dx.stride(),
                          ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=block_c, BLOCK_P=block_p)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)
