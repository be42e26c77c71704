"""Subpopulation-shift data: a rare transformed subgroup inside every class, and a group-balanced test split."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dataset import ImageDataset, channel_stats

TRANSFORMS = ("rotate", "thin")
GROUP_NAMES = {"rotate": ["common", "rotated"], "thin": ["common", "thinned"]}


class SubpopSplit(NamedTuple):
    train: ImageDataset  # domains: 0 = common, 1 = rare subgroup (rare_fraction of each class)
    test: ImageDataset   # same groups, balanced: half of each class's test images are transformed


def rotate_images(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate uint8 images [N, C, H, W] by per-image angles (degrees, positive = counter-clockwise on screen).

    Bilinear resampling about the centre with zero fill, through affine_grid/grid_sample in float32.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"rotate_images: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    degrees = torch.as_tensor(degrees, dtype=torch.float32).reshape(-1)
    if degrees.shape[0] != images.shape[0]:
        raise ValueError(f"rotate_images: degrees has {degrees.shape[0]} angles for {images.shape[0]} images")
    if images.shape[0] == 0:
        return images.clone()
    rad = torch.deg2rad(degrees)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # Output pixel (x, y) (y pointing down) samples the input at the inverse rotation of (x, y).
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    x = images.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _erode_half(x: Tensor, forward: bool) -> Tensor:
    # min over the pixel and its right+lower (forward) or left+upper neighbours: strokes lose one pixel of width
    if forward:
        p = F.pad(x, (0, 1, 0, 1))
        return torch.minimum(torch.minimum(p[..., :-1, :-1], p[..., :-1, 1:]), p[..., 1:, :-1])
    p = F.pad(x, (1, 0, 1, 0))
    return torch.minimum(torch.minimum(p[..., 1:, 1:], p[..., 1:, :-1]), p[..., :-1, 1:])


def thin_strokes(images: Tensor, steps: int = 2, min_ink: float = 0.25) -> Tensor:
    """Thin bright strokes on a dark background by grey-level erosion, one pixel of stroke width per step.

    Steps alternate the erosion direction (so the digit does not drift); an image stops thinning before a step
    that would leave it less than ``min_ink`` of its original ink, so already thin strokes never vanish.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"thin_strokes: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    ink = images.sum((1, 2, 3), dtype=torch.float64)
    x = images
    for step in range(steps):
        nxt = _erode_half(x, forward=step % 2 == 0)
        keep = nxt.sum((1, 2, 3), dtype=torch.float64) >= min_ink * ink
        x = torch.where(keep[:, None, None, None], nxt, x)
    return x.contiguous()


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"make_subpop_shift: {name} must lie in (0, 1), got {value}")
    return value


def make_subpop_shift(pool: ImageDataset, *, transform: str = "rotate", rare_fraction: float = 0.05,
                      test_fraction: float = 0.2, angle_range: tuple[float, float] = (60.0, 90.0),
                      thin_steps: int = 2, seed: int = 0) -> SubpopSplit:
    """Split ``pool`` per class into train/test and transform a subgroup of each class.

    Train: ``max(1, round(rare_fraction * n))`` of each class's n train images are transformed (group 1, rare);
    the rest stay as they are (group 0). Test: ``round(test_fraction * class size)`` images per class, rounded
    down to an even count, exactly half of them transformed, so every (class, group) cell is balanced.
    ``transform="rotate"``: rotation by an angle drawn uniformly in ``angle_range`` degrees (counter-clockwise);
    ``"thin"``: stroke thinning by grey-level erosion (``thin_steps`` pixels of width, see ``thin_strokes``).
    Group ids are in ``domains`` (names in ``domain_names``; any domains of the pool are replaced); use
    ``group_ids`` for (class, group) cells.
    Normalisation stats are measured on the new train split and shared by both splits. Deterministic in ``seed``.
    """
    if not isinstance(pool, ImageDataset):
        raise TypeError(f"make_subpop_shift: pool must be an ImageDataset, got {type(pool).__name__}")
    if transform not in TRANSFORMS:
        raise ValueError(f"make_subpop_shift: transform must be one of {TRANSFORMS}, got {transform!r}")
    rare_fraction = _check_fraction("rare_fraction", rare_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    lo, hi = (float(a) for a in angle_range)
    if not lo <= hi:
        raise ValueError(f"make_subpop_shift: angle_range must be (low, high) with low <= high, got {angle_range}")
    gen = torch.Generator().manual_seed(int(seed))
    n = len(pool)
    is_test = torch.zeros(n, dtype=torch.bool)
    is_rare = torch.zeros(n, dtype=torch.bool)
    for c in range(pool.num_classes):
        idx = (pool.labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = 2 * (int(math.floor(test_fraction * idx.numel() + 0.5)) // 2)
        test_idx, train_idx = idx[:n_test], idx[n_test:]
        if train_idx.numel() < 2 or n_test < 2:
            raise ValueError(f"make_subpop_shift: class {c} has {idx.numel()} images, too few for a train split "
                             f"with a rare subgroup and a balanced test split (test_fraction={test_fraction})")
        n_rare = max(1, int(math.floor(rare_fraction * train_idx.numel() + 0.5)))
        is_test[test_idx] = True
        is_rare[test_idx[: n_test // 2]] = True
        is_rare[train_idx[:n_rare]] = True
    images = pool.images.clone()
    rare_idx = is_rare.nonzero().squeeze(1)
    if transform == "rotate":
        angles = lo + (hi - lo) * torch.rand(rare_idx.numel(), generator=gen)
        images[rare_idx] = rotate_images(pool.images[rare_idx], angles)
    else:
        images[rare_idx] = thin_strokes(pool.images[rare_idx], thin_steps)
    groups = is_rare.long()
    mean, std = channel_stats(images[~is_test])
    name = f"{pool.name}-subpop-{transform}"

    def part(mask: Tensor) -> ImageDataset:
        return ImageDataset(images=images[mask].contiguous(), labels=pool.labels[mask].contiguous(),
                            num_classes=pool.num_classes, mean=mean, std=std, name=name,
                            class_names=list(pool.class_names), domains=groups[mask].contiguous(),
                            domain_names=list(GROUP_NAMES[transform]))

    return SubpopSplit(part(~is_test), part(is_test))


def group_ids(ds: ImageDataset) -> Tensor:
    """(class, group) cell of every sample: ``label * num_groups + domain`` (int64 [N]); needs ``ds.domains``."""
    if ds.domains is None:
        raise ValueError(f"group_ids: dataset {ds.name!r} carries no group labels (domains is None)")
    return ds.labels * len(ds.domain_names) + ds.domains
