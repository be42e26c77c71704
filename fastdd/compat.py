"""Drop-in API with the reference code's signatures (DiffAugment, ParamDiffAug, DM class loss), accelerated.

An existing DM script switches by changing imports: `from fastdd.compat import DiffAugment, ParamDiffAug`.
Like the reference, DiffAugment seeds and draws from the GLOBAL torch RNG (same draws for the same seed);
the transforms themselves run through fastdd's batched ops.
"""
import math

import torch

from fastdd.augment import AugDraw, SiameseAugment
from fastdd.augment import ParamDiffAug as _ParamDiffAug
from fastdd.augment.draw import crop_shift, cutout_size
from fastdd.augment.params import parse_strategy
from fastdd.distill.methods.dm import dm_class_losses

_COLOR_OPS = ("brightness", "saturation", "contrast")


class ParamDiffAug(_ParamDiffAug):
    """The reference's ParamDiffAug, with its mutable batchmode/latestseed fields."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batchmode = False
        self.latestseed = -1
        self.Siamese = True


def _next_seed(param) -> None:
    if param.latestseed == -1:
        return
    torch.random.manual_seed(param.latestseed)
    param.latestseed += 1


def _draw_reference(x: torch.Tensor, op: str, ops: tuple, param) -> AugDraw:
    """The reference's per-op RNG calls (same shapes, same order); siamese keeps entry 0 for the batch."""
    n, dev, dt = x.shape[0], x.device, x.dtype
    size = tuple(x.shape[2:])
    first = (lambda t: t[:1].expand_as(t).clone()) if param.batchmode else (lambda t: t)
    zeros = torch.zeros(n, device=dev)
    p = dict(brightness=zeros, saturation=zeros + 1, contrast=zeros + 1, flip=torch.zeros(n, dtype=torch.bool, device=dev),
             crop=torch.zeros(n, 2, dtype=torch.long, device=dev), cutout=torch.zeros(n, 2, dtype=torch.long, device=dev),
             scale=torch.ones(n, 2, device=dev), rotate=zeros)
    if op == "color":
        _next_seed(param)
        p["brightness"] = (first(torch.rand(n, 1, 1, 1, dtype=dt, device=dev)).flatten().float() - 0.5) * param.brightness
        _next_seed(param)
        p["saturation"] = first(torch.rand(n, 1, 1, 1, dtype=dt, device=dev)).flatten().float() * param.saturation
        _next_seed(param)
        p["contrast"] = first(torch.rand(n, 1, 1, 1, dtype=dt, device=dev)).flatten().float() + param.contrast
    elif op in ("crop", "cutout"):
        bounds = crop_shift(size, param) if op == "crop" else cutout_size(size, param)
        axes = []
        for a in range(2):
            _next_seed(param)
            low, high = ((-bounds[a], bounds[a] + 1) if op == "crop" else (0, size[a] + (1 - bounds[a] % 2)))
            axes.append(first(torch.randint(low, high, size=[n, 1, 1], device=dev)).flatten())
        p[op] = torch.stack(axes, 1)
    elif op == "flip":
        _next_seed(param)
        p["flip"] = first(torch.rand(n, 1, 1, 1, device=dev)).flatten() < param.prob_flip
    elif op == "scale":
        r = param.ratio_scale
        _next_seed(param)
        sx = first(torch.rand(n) * (r - 1.0 / r) + 1.0 / r)
        _next_seed(param)
        sy = first(torch.rand(n) * (r - 1.0 / r) + 1.0 / r)
        p["scale"] = torch.stack([sx, sy], 1).float().to(dev)
    elif op == "rotate":
        _next_seed(param)
        p["rotate"] = first((torch.rand(n) - 0.5) * 2 * param.ratio_rotate / 180 * float(math.pi)).float().to(dev)
    return AugDraw(op_index=torch.full((n,), ops.index(op), dtype=torch.long, device=dev), ops=ops,
                   image_size=size, cutout_size=cutout_size(size, param), **p)


def DiffAugment(x: torch.Tensor, strategy: str = "", seed: int = -1, param=None) -> torch.Tensor:  # noqa: N802
    """Reference semantics: seed = -1 draws per sample, otherwise one draw shared by the batch (siamese)."""
    param = param if param is not None else ParamDiffAug()
    param.batchmode = seed != -1
    param.latestseed = seed
    if not strategy or strategy.lower() == "none":
        return x
    ops = parse_strategy(strategy)
    chosen = ops
    if param.aug_mode == "S":
        _next_seed(param)
        chosen = (ops[torch.randint(0, len(ops), size=(1,)).item()],)
    elif param.aug_mode != "M":
        raise ValueError(f"DiffAugment: param.aug_mode must be 'S' or 'M', got {param.aug_mode!r}")
    per_sample = torch.arange(x.shape[0], device=x.device)
    for op in chosen:
        draw = _draw_reference(x, op, ops, param)
        x = SiameseAugment(op, _plain(param)).apply(x, per_sample, _restrict(draw, op))
    return x.contiguous()


def _plain(param) -> _ParamDiffAug:
    return _ParamDiffAug(**{k: getattr(param, k) for k in _ParamDiffAug.__dataclass_fields__})


def _restrict(draw: AugDraw, op: str) -> AugDraw:
    from dataclasses import replace
    return replace(draw, ops=(op,), op_index=torch.zeros_like(draw.op_index))


def dm_class_loss(embed, images_real, images_syn, dsa_strategy: str | None = None, seeds=None, dsa_param=None):
    """The reference DM loss Σ_c ‖mean(embed(real_c)).detach() − mean(embed(syn_c))‖² in two forwards.

    images_real / images_syn: lists with one tensor per class. With DSA, class c is augmented with
    `seeds[c]` exactly as the reference's per-class `DiffAugment(..., seed=seeds[c])` calls.
    """
    if len(images_real) != len(images_syn):
        raise ValueError(f"dm_class_loss: images_real has {len(images_real)} classes, images_syn {len(images_syn)}")
    if dsa_strategy and dsa_strategy.lower() != "none":
        if seeds is None or len(seeds) != len(images_real):
            raise ValueError("dm_class_loss: seeds must give one seed per class when dsa_strategy is set")
        param = dsa_param if dsa_param is not None else ParamDiffAug()
        images_real = [DiffAugment(r, dsa_strategy, int(s), param) for r, s in zip(images_real, seeds)]
        images_syn = [DiffAugment(y, dsa_strategy, int(s), param) for y, s in zip(images_syn, seeds)]
    device = images_syn[0].device
    real_seg = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in enumerate(images_real)]).to(device)
    syn_seg = torch.cat([torch.full((len(s),), c, dtype=torch.long) for c, s in enumerate(images_syn)]).to(device)
    with torch.no_grad():
        real_features = embed(torch.cat(images_real))
    syn_features = embed(torch.cat(images_syn))
    return dm_class_losses(real_features, real_seg, syn_features, syn_seg, len(images_real)).sum()
