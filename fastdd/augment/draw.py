"""AugDraw: one DSA parameter draw per group, sampled for all groups in a single RNG call."""
import math
import os
from dataclasses import dataclass, fields, replace

import torch

_NUM_UNIFORMS = 12  # op choice, brightness, saturation, contrast, crop h/w, cutout h/w, flip, scale x/y, rotate


@dataclass(frozen=True)
class AugDraw:
    """Tensors are indexed by group: [num_groups] or [num_groups, 2] (height axis first)."""

    op_index: torch.Tensor  # int64, position in `ops`
    brightness: torch.Tensor  # additive shift
    saturation: torch.Tensor  # factor around the per-pixel channel mean
    contrast: torch.Tensor  # factor around the per-image mean
    crop: torch.Tensor  # int64 [G, 2]: translation in pixels along (H, W)
    cutout: torch.Tensor  # int64 [G, 2]: reference cutout offset (square centre) along (H, W)
    flip: torch.Tensor  # bool: mirror along W
    scale: torch.Tensor  # [G, 2]: (sx, sy) affine factors
    rotate: torch.Tensor  # angle in radians
    ops: tuple[str, ...]
    image_size: tuple[int, int]
    cutout_size: tuple[int, int]

    @property
    def num_groups(self) -> int:
        return self.op_index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.op_index.device

    def to(self, device) -> "AugDraw":
        """Host-to-GPU moves are one packed non-blocking copy from pinned memory (no device sync)."""
        device = torch.device(device)
        if device == self.device:
            return self
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        if self.device.type == "cpu" and device.type == "cuda":
            return replace(self, **_packed_copy_to(device, {name: getattr(self, name) for name in names}))
        # A non-blocking copy to the host could be read before it lands: these copies block.
        return replace(self, **{name: getattr(self, name).to(device) for name in names})

    def with_single_op(self) -> "AugDraw":
        """Every group takes group 0's op: one op group per call, parameters still per group."""
        return replace(self, op_index=self.op_index[:1].expand_as(self.op_index).contiguous())


def _packed_copy_to(device: torch.device, tensors: dict) -> dict:
    """All tensors as float64 columns of one pinned buffer, copied once; exact for the small ints,
    bools and float32 values a draw holds."""
    rows = next(iter(tensors.values())).shape[0]
    columns = [t.reshape(rows, -1).to(torch.float64) for t in tensors.values()]
    packed = torch.cat(columns, 1)
    if torch.cuda.is_available():
        packed = packed.pin_memory()
    on_device = packed.to(device, non_blocking=True)
    moved, start = {}, 0
    for (name, t), column in zip(tensors.items(), columns):
        width = column.shape[1]
        moved[name] = on_device[:, start:start + width].to(t.dtype).reshape(t.shape)
        start += width
    return moved


def fresh_generator(device=None) -> torch.Generator:
    """Seeded from OS entropy: the global RNG and the clock stay untouched."""
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def crop_shift(image_size: tuple[int, int], param) -> tuple[int, int]:
    return tuple(int(side * param.ratio_crop_pad + 0.5) for side in image_size)


def cutout_size(image_size: tuple[int, int], param) -> tuple[int, int]:
    return tuple(int(side * param.ratio_cutout + 0.5) for side in image_size)


def _uniform_int(u: torch.Tensor, low: int, count: int) -> torch.Tensor:
    """Uniform integer in [low, low + count) from u ~ U[0, 1)."""
    return (u * count).floor().long().clamp_(max=count - 1) + low


def draw_parameters(ops: tuple[str, ...], param, num_groups: int, image_size: tuple[int, int],
                    generator: torch.Generator | None = None, device=None) -> AugDraw:
    if generator is None:
        generator = fresh_generator()
    u = torch.rand(num_groups, _NUM_UNIFORMS, generator=generator, dtype=torch.float64,
                   device=generator.device)
    shift = crop_shift(image_size, param)
    cut = cutout_size(image_size, param)
    ratio = param.ratio_scale
    cutout_range = [side + (1 - c % 2) for side, c in zip(image_size, cut)]
    draw = AugDraw(
        op_index=_uniform_int(u[:, 0], 0, max(len(ops), 1)),
        brightness=((u[:, 1] - 0.5) * param.brightness).float(),
        saturation=(u[:, 2] * param.saturation).float(),
        contrast=(u[:, 3] + param.contrast).float(),
        crop=torch.stack([_uniform_int(u[:, 4 + a], -shift[a], 2 * shift[a] + 1) for a in range(2)], 1),
        cutout=torch.stack([_uniform_int(u[:, 6 + a], 0, cutout_range[a]) for a in range(2)], 1),
        flip=u[:, 8] < param.prob_flip,
        scale=(u[:, 9:11] * (ratio - 1.0 / ratio) + 1.0 / ratio).float(),
        rotate=((u[:, 11] - 0.5) * 2 * param.ratio_rotate / 180 * math.pi).float(),
        ops=tuple(ops),
        image_size=tuple(image_size),
        cutout_size=cut,
    )
    return draw.to(device) if device is not None else draw
