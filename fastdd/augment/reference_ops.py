"""Reference DiffAugment ops, each applying ONE explicit parameter set to a whole batch (its per-class seeded mode)."""
import torch
import torch.nn.functional as F

from fastdd.augment.draw import AugDraw

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _scalar(value, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(float(value), dtype=dtype or x.dtype, device=x.device)


def brightness(x: torch.Tensor, shift) -> torch.Tensor:
    return x + _scalar(shift, x)


def saturation(x: torch.Tensor, factor) -> torch.Tensor:
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * _scalar(factor, x) + x_mean


def contrast(x: torch.Tensor, factor) -> torch.Tensor:
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * _scalar(factor, x) + x_mean


def color(x: torch.Tensor, shift, saturation_factor, contrast_factor) -> torch.Tensor:
    return contrast(saturation(brightness(x, shift), saturation_factor), contrast_factor)


def crop(x: torch.Tensor, translation_h: int, translation_w: int) -> torch.Tensor:
    """Pad 1 px of zeros, then read every pixel at its translated, clamped position."""
    n, _, height, width = x.shape
    grid_batch, grid_h, grid_w = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(height, device=x.device),
        torch.arange(width, device=x.device), indexing="ij")
    grid_h = torch.clamp(grid_h + int(translation_h) + 1, 0, height + 1)
    grid_w = torch.clamp(grid_w + int(translation_w) + 1, 0, width + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_h, grid_w].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, offset_h: int, offset_w: int, size: tuple[int, int]) -> torch.Tensor:
    n, _, height, width = x.shape
    grid_batch, grid_h, grid_w = torch.meshgrid(
        torch.arange(n, device=x.device), torch.arange(size[0], device=x.device),
        torch.arange(size[1], device=x.device), indexing="ij")
    grid_h = torch.clamp(grid_h + int(offset_h) - size[0] // 2, min=0, max=height - 1)
    grid_w = torch.clamp(grid_w + int(offset_w) - size[1] // 2, min=0, max=width - 1)
    mask = torch.ones(n, height, width, dtype=x.dtype, device=x.device)
    mask[grid_batch, grid_h, grid_w] = 0
    return x * mask.unsqueeze(1)


def flip(x: torch.Tensor, flipped: bool) -> torch.Tensor:
    return x.flip(3) if bool(flipped) else x


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    compute_dtype = theta.dtype
    theta = theta.unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(compute_dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


def _affine_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def scale(x: torch.Tensor, scale_x, scale_y) -> torch.Tensor:
    dtype = _affine_dtype(x)
    theta = torch.tensor([[float(scale_x), 0.0, 0.0], [0.0, float(scale_y), 0.0]], dtype=dtype, device=x.device)
    return _affine(x, theta)


def rotate(x: torch.Tensor, angle) -> torch.Tensor:
    """angle in radians, anticlockwise positive as in the reference."""
    angle = _scalar(angle, x, _affine_dtype(x))
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero]), torch.stack([sin, cos, zero])])
    return _affine(x, theta)


def apply_op(x: torch.Tensor, name: str, draw: AugDraw, group_index: int) -> torch.Tensor:
    """Op group `name` with group `group_index`'s parameters from `draw`, on the whole batch."""
    g = int(group_index)
    if name == "color":
        return color(x, draw.brightness[g], draw.saturation[g], draw.contrast[g])
    if name == "crop":
        return crop(x, *draw.crop[g].tolist())
    if name == "cutout":
        return cutout(x, *draw.cutout[g].tolist(), size=draw.cutout_size)
    if name == "flip":
        return flip(x, draw.flip[g])
    if name == "scale":
        return scale(x, *draw.scale[g].tolist())
    if name == "rotate":
        return rotate(x, draw.rotate[g])
    raise ValueError(f"apply_op: unknown op name {name!r}")


def apply_group(x: torch.Tensor, draw: AugDraw, group_index: int, aug_mode: str = "S") -> torch.Tensor:
    """Reference DiffAugment for one class: the op group drawn for `group_index` ('S') or every op ('M')."""
    if not draw.ops:
        return x
    if aug_mode == "M":
        for name in draw.ops:
            x = apply_op(x, name, draw, group_index)
        return x
    return apply_op(x, draw.ops[int(draw.op_index[int(group_index)])], draw, group_index)
