"""Test oracle: DiffAugment written directly from the reference's per-op semantics (global RNG, plain ops)."""
import numpy as np
import torch
import torch.nn.functional as F


def _seed(p):
    if p.latestseed != -1:
        torch.random.manual_seed(p.latestseed)
        p.latestseed += 1


def _same(t, p):
    if p.batchmode:
        t[:] = t[0].clone()
    return t


def brightness(x, p):
    _seed(p)
    return x + (_same(torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device), p) - 0.5) * p.brightness


def saturation(x, p):
    m = x.mean(dim=1, keepdim=True)
    _seed(p)
    return (x - m) * (_same(torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device), p) * p.saturation) + m


def contrast(x, p):
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    _seed(p)
    return (x - m) * (_same(torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device), p) + p.contrast) + m


def crop(x, p):
    sx, sy = int(x.size(2) * p.ratio_crop_pad + 0.5), int(x.size(3) * p.ratio_crop_pad + 0.5)
    _seed(p)
    tx = _same(torch.randint(-sx, sx + 1, size=[x.size(0), 1, 1], device=x.device), p)
    _seed(p)
    ty = _same(torch.randint(-sy, sy + 1, size=[x.size(0), 1, 1], device=x.device), p)
    gb, gx, gy = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)), torch.arange(x.size(3)),
                                indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
    gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
    return F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def cutout(x, p):
    cs = int(x.size(2) * p.ratio_cutout + 0.5), int(x.size(3) * p.ratio_cutout + 0.5)
    _seed(p)
    ox = _same(torch.randint(0, x.size(2) + (1 - cs[0] % 2), size=[x.size(0), 1, 1], device=x.device), p)
    _seed(p)
    oy = _same(torch.randint(0, x.size(3) + (1 - cs[1] % 2), size=[x.size(0), 1, 1], device=x.device), p)
    gb, gx, gy = torch.meshgrid(torch.arange(x.size(0)), torch.arange(cs[0]), torch.arange(cs[1]), indexing="ij")
    gx = torch.clamp(gx + ox - cs[0] // 2, min=0, max=x.size(2) - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


def flip(x, p):
    _seed(p)
    r = _same(torch.rand(x.size(0), 1, 1, 1, device=x.device), p)
    return torch.where(r < p.prob_flip, x.flip(3), x)


def scale(x, p):
    r = p.ratio_scale
    _seed(p)
    sx = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    _seed(p)
    sy = torch.rand(x.shape[0]) * (r - 1.0 / r) + 1.0 / r
    theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    if p.batchmode:
        theta[:] = theta[0].clone()
    grid = F.affine_grid(theta, x.shape, align_corners=False).to(x.device)
    return F.grid_sample(x, grid, align_corners=False)


def rotate(x, p):
    _seed(p)
    t = (torch.rand(x.shape[0]) - 0.5) * 2 * p.ratio_rotate / 180 * float(np.pi)
    theta = [[[torch.cos(t[i]), torch.sin(-t[i]), 0], [torch.sin(t[i]), torch.cos(t[i]), 0]] for i in range(x.shape[0])]
    theta = torch.tensor(theta, dtype=torch.float)
    if p.batchmode:
        theta[:] = theta[0].clone()
    grid = F.affine_grid(theta, x.shape, align_corners=False).to(x.device)
    return F.grid_sample(x, grid, align_corners=False)


FNS = {"color": [brightness, saturation, contrast], "crop": [crop], "cutout": [cutout], "flip": [flip],
       "scale": [scale], "rotate": [rotate]}


def diff_augment(x, strategy, seed, p):
    p.batchmode = seed != -1
    p.latestseed = seed
    if not strategy or strategy.lower() == "none":
        return x
    ops = strategy.split("_")
    _seed(p)
    op = ops[torch.randint(0, len(ops), size=(1,)).item()]
    for f in FNS[op]:
        x = f(x, p)
    return x.contiguous()
