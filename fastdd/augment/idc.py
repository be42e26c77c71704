"""IDC's augmentation: DiffAug flip → colour → crop → cutout with one draw per group, and CutMix."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IDC_OPS = ("flip", "color", "crop", "cutout")
CROP_RATIO, CUTOUT_RATIO, BRIGHTNESS, SATURATION, CONTRAST = 0.125, 0.5, 1.0, 2.0, 0.5


def parse_idc_strategy(strategy: str, key: str = "aug_type") -> tuple[str, ...]:
    """'color_crop_cutout' -> ('color', 'crop', 'cutout'); '' or 'none' -> ()."""
    if strategy in ("", "none", None):
        return ()
    ops = tuple(strategy.lower().split("_"))
    unknown = [op for op in ops if op not in IDC_OPS]
    if unknown:
        raise ValueError(f"config key {key!r}: unknown IDC augmentation(s) {unknown}; valid: {', '.join(IDC_OPS)}")
    return ops


@dataclass
class IDCDraw:
    """Per-group draws (None: op not in the strategy); group g's rows all use row g of each."""
    flip: torch.Tensor | None = None        # [G] bool
    color: torch.Tensor | None = None       # [G, 3] uniform: brightness, saturation, contrast
    crop: torch.Tensor | None = None        # [G, 2] int shifts along H, W in [−s, s]
    cutout: torch.Tensor | None = None      # [G, 2] int centres along H, W


def _shift(size: int) -> int:
    return int(size * CROP_RATIO + 0.5)


def _cut(size: int) -> int:
    return int(size * CUTOUT_RATIO + 0.5)


class IDCAugment:
    """IDC's DiffAug on normalised images: `batch=True` there is one group per call; per-sample is one
    group per row. Ops run in IDC's order whatever the strategy order: flip, colour (brightness,
    saturation, contrast), crop (1-pixel zero pad, shift), cutout (zeroed square, clamped)."""

    def __init__(self, strategy: str, key: str = "aug_type"):
        self.ops = parse_idc_strategy(strategy, key)

    def draw(self, groups: int, size: tuple[int, int], generator: torch.Generator, device=None) -> IDCDraw | None:
        if not self.ops:
            return None
        height, width = size
        out = IDCDraw()
        if "flip" in self.ops:
            out.flip = torch.rand(groups, generator=generator) < 0.5
        if "color" in self.ops:
            out.color = torch.rand(groups, 3, generator=generator)
        if "crop" in self.ops:
            sh, sw = _shift(height), _shift(width)
            out.crop = torch.stack([torch.randint(-sh, sh + 1, (groups,), generator=generator),
                                    torch.randint(-sw, sw + 1, (groups,), generator=generator)], 1)
        if "cutout" in self.ops:
            ch, cw = _cut(height), _cut(width)
            out.cutout = torch.stack([torch.randint(0, height + 1 - ch % 2, (groups,), generator=generator),
                                      torch.randint(0, width + 1 - cw % 2, (groups,), generator=generator)], 1)
        if device is not None:
            out = IDCDraw(*(None if t is None else t.to(device) for t in (out.flip, out.color, out.crop, out.cutout)))
        return out

    def apply(self, x: torch.Tensor, group: torch.Tensor, draw: IDCDraw | None) -> torch.Tensor:
        if draw is None:
            return x
        group = group.to(x.device)
        n, _, height, width = x.shape
        per_row = (-1, 1, 1, 1)
        if draw.flip is not None:
            x = torch.where(draw.flip.to(x.device)[group].view(per_row), x.flip(3), x)
        if draw.color is not None:
            color = draw.color.to(x.device, x.dtype)[group]
            x = x + (color[:, 0].view(per_row) - 0.5) * BRIGHTNESS
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (color[:, 1].view(per_row) * SATURATION) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (color[:, 2].view(per_row) + CONTRAST) + mean
        if draw.crop is not None:
            shift = draw.crop.to(x.device)[group]
            rows = (torch.arange(height, device=x.device) + shift[:, :1] + 1).clamp(0, height + 1)
            cols = (torch.arange(width, device=x.device) + shift[:, 1:] + 1).clamp(0, width + 1)
            padded = F.pad(x, (1, 1, 1, 1))
            batch = torch.arange(n, device=x.device).view(-1, 1, 1)
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if draw.cutout is not None:
            ch, cw = _cut(height), _cut(width)
            centre = draw.cutout.to(x.device)[group]
            lo_h, lo_w = centre[:, :1] - ch // 2, centre[:, 1:] - cw // 2
            r, c = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
            in_h = (r >= lo_h) & (r <= lo_h + ch - 1)   # [n, H]; IDC's clamping keeps this range contiguous
            in_w = (c >= lo_w) & (c <= lo_w + cw - 1)
            mask = ~(in_h[:, :, None] & in_w[:, None, :])
            x = x * mask.unsqueeze(1).to(x.dtype)
        return x.contiguous()


@dataclass
class CutMixDraw:
    perm: torch.Tensor   # [N] partner of every row
    box: tuple[int, int, int, int]  # rows h1:h2, columns w1:w2 taken from the partner
    ratio: float         # weight of the own label: 1 − box area / image area


def draw_cutmix(n: int, size: tuple[int, int], beta: float, mix_p: float,
                generator: torch.Generator) -> CutMixDraw | None:
    """IDC's train_epoch CutMix: with probability mix_p, λ ~ Beta(β, β), a random partner permutation and
    a box of side ⌊side·√(1−λ)⌋ centred uniformly (clipped to the image)."""
    if float(torch.rand((), generator=generator)) >= mix_p:
        return None
    lam = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator))).beta(beta, beta)
    perm = torch.randperm(n, generator=generator)
    height, width = size
    cut_h, cut_w = int(height * np.sqrt(1.0 - lam)), int(width * np.sqrt(1.0 - lam))
    ch = int(torch.randint(0, height, (1,), generator=generator))
    cw = int(torch.randint(0, width, (1,), generator=generator))
    h1, h2 = int(np.clip(ch - cut_h // 2, 0, height)), int(np.clip(ch + cut_h // 2, 0, height))
    w1, w2 = int(np.clip(cw - cut_w // 2, 0, width)), int(np.clip(cw + cut_w // 2, 0, width))
    return CutMixDraw(perm, (h1, h2, w1, w2), 1.0 - (h2 - h1) * (w2 - w1) / (height * width))


def cutmix_loss(net, x: torch.Tensor, y: torch.Tensor, draw: CutMixDraw | None) -> torch.Tensor:
    """CE of `net` on the CutMix batch: ratio·CE(own labels) + (1 − ratio)·CE(partner labels)."""
    if draw is None:
        return F.cross_entropy(net(x), y)
    h1, h2, w1, w2 = draw.box
    perm = draw.perm.to(x.device)
    x = x.clone()
    x[:, :, h1:h2, w1:w2] = x[perm, :, h1:h2, w1:w2]
    out = net(x)
    return F.cross_entropy(out, y) * draw.ratio + F.cross_entropy(out, y[perm]) * (1.0 - draw.ratio)
