"""Batched siamese DSA: one independent draw per group, shared by every sample of that group, one call for all groups."""
import torch

from fastdd.augment import batched_ops
from fastdd.augment.draw import AugDraw, draw_parameters
from fastdd.augment.params import OP_NAMES, STRATEGY_DEFAULT, ParamDiffAug, check_param, parse_strategy

_KIND = {name: kind for kind, name in enumerate(OP_NAMES)}
_AFFINE_BUCKET = _KIND["scale"]  # scale and rotate share one affine_grid/grid_sample pass
_NUM_BUCKETS = _AFFINE_BUCKET + 1
assert _KIND["rotate"] == _AFFINE_BUCKET + 1


def _check_images(where: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be floating point, got {x.dtype}")


def _checked_group(where: str, group, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(group, torch.Tensor):
        raise TypeError(f"{where}: group must be an int64 Tensor, got {type(group).__name__}")
    if group.dtype == torch.bool or group.is_floating_point() or group.is_complex():
        raise TypeError(f"{where}: group must be an integer (int64) tensor, got {group.dtype}")
    if group.dim() != 1 or group.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: group must be 1-D with one id per image ({x.shape[0]}), "
                         f"got shape {tuple(group.shape)}")
    return group.to(device=x.device, dtype=torch.int64)


def _raise_if_out_of_range(where: str, low: int, high: int, num_groups: int) -> None:
    if low < 0 or high >= num_groups:
        raise ValueError(f"{where}: group ids must lie in [0, num_groups={num_groups}), "
                         f"found values in [{low}, {high}]")


def _check_range(where: str, group: torch.Tensor, num_groups: int) -> None:
    """On the host: ValueError. On a GPU: a device-side assert, so the stream never waits for the host."""
    if group.device.type == "cpu":
        low, high = torch.stack(torch.aminmax(group)).tolist()
        _raise_if_out_of_range(where, low, high, num_groups)
        return
    torch._assert_async(((group >= 0) & (group < num_groups)).all(),
                        f"{where}: group ids must lie in [0, num_groups={num_groups})")


def _image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (H, W) of positive ints, got {image_size!r}")
    return size


class SiameseAugment:
    """DSA in the reference's aug_mode 'S' (or 'M'), with the per-class seeded draw batched as groups."""

    def __init__(self, strategy: str = STRATEGY_DEFAULT, param=None):
        self.ops = parse_strategy(strategy)
        self.param = ParamDiffAug() if param is None else param
        check_param(self.param)
        self._position_kind = torch.tensor([_KIND[name] for name in self.ops], dtype=torch.int64)
        self._position_kind_on: dict[torch.device, torch.Tensor] = {}

    def draw(self, num_groups: int, image_size, generator: torch.Generator | None = None,
             device=None) -> AugDraw:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"SiameseAugment.draw: num_groups must be a positive int, got {num_groups!r}")
        return draw_parameters(self.ops, self.param, num_groups, _image_size(image_size), generator, device)

    def apply(self, x: torch.Tensor, group: torch.Tensor, draw: AugDraw) -> torch.Tensor:
        where = "SiameseAugment.apply"
        _check_images(where, x)
        group = _checked_group(where, group, x)
        if not isinstance(draw, AugDraw):
            raise TypeError(f"{where}: draw must be an AugDraw from SiameseAugment.draw, got {type(draw).__name__}")
        if draw.ops != self.ops:
            raise ValueError(f"{where}: draw was made for strategy ops {draw.ops}, this augmenter has {self.ops}")
        if tuple(x.shape[2:]) != draw.image_size:
            raise ValueError(f"{where}: draw was made for image_size {draw.image_size}, "
                             f"x has {tuple(x.shape[2:])}")
        if not self.ops or x.shape[0] == 0:
            return x
        draw = draw.to(x.device)
        if self.param.aug_mode == "M":
            _check_range(where, group, draw.num_groups)
            for name in self.ops:
                kind = _KIND[name]
                x = self._apply_bucket(min(kind, _AFFINE_BUCKET), x, group, torch.full_like(group, kind), draw)
            return x.contiguous()
        return self._apply_single_mode(where, x, group, draw).contiguous()

    def __call__(self, x: torch.Tensor, group: torch.Tensor, num_groups: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images("SiameseAugment.__call__", x)
        draw = self.draw(num_groups, tuple(x.shape[2:]), generator, device=x.device)
        return self.apply(x, group, draw)

    def _apply_single_mode(self, where: str, x: torch.Tensor, group: torch.Tensor,
                           draw: AugDraw) -> torch.Tensor:
        if x.device.type == "cpu":
            return self._apply_sorted_by_bucket(where, x, group, draw)
        _check_range(where, group, draw.num_groups)
        return self._apply_masked(x, group, draw)

    def _sample_kind(self, group: torch.Tensor, draw: AugDraw) -> torch.Tensor:
        device = group.device
        if device not in self._position_kind_on:
            self._position_kind_on[device] = self._position_kind.to(device)
        return self._position_kind_on[device][draw.op_index[group.clamp(0, draw.num_groups - 1)]]

    def _apply_sorted_by_bucket(self, where: str, x: torch.Tensor, group: torch.Tensor,
                                draw: AugDraw) -> torch.Tensor:
        """CPU: each op runs on its own samples only; the bucket sizes are read on the host."""
        num_groups = draw.num_groups
        sample_kind = self._sample_kind(group, draw)
        sample_bucket = sample_kind.clamp(max=_AFFINE_BUCKET)
        stats = torch.cat([torch.stack(torch.aminmax(group)),
                           torch.bincount(sample_bucket, minlength=_NUM_BUCKETS)]).tolist()
        _raise_if_out_of_range(where, stats[0], stats[1], num_groups)
        counts = stats[2:]
        present = [bucket for bucket, count in enumerate(counts) if count]
        if len(present) == 1:
            return self._apply_bucket(present[0], x, group, sample_kind, draw)
        order = torch.argsort(sample_bucket, stable=True)
        out = torch.empty_like(x)
        for bucket, members in enumerate(order.split(counts)):
            if counts[bucket]:
                part = self._apply_bucket(bucket, x.index_select(0, members), group.index_select(0, members),
                                          sample_kind.index_select(0, members), draw)
                out.index_copy_(0, members, part)
        return out

    def _apply_masked(self, x: torch.Tensor, group: torch.Tensor, draw: AugDraw) -> torch.Tensor:
        """GPU, sync-free: every bucket of the strategy runs on the whole batch and each sample keeps its
        own bucket's result (per-sample ops, so the values equal the sorted path's)."""
        sample_kind = self._sample_kind(group, draw)
        sample_bucket = sample_kind.clamp(max=_AFFINE_BUCKET).view(-1, 1, 1, 1)
        buckets = sorted({min(_KIND[name], _AFFINE_BUCKET) for name in self.ops})
        out = self._apply_bucket(buckets[0], x, group, sample_kind, draw)
        for bucket in buckets[1:]:
            out = torch.where(sample_bucket == bucket, self._apply_bucket(bucket, x, group, sample_kind, draw), out)
        return out

    @staticmethod
    def _apply_bucket(bucket: int, x: torch.Tensor, group: torch.Tensor, sample_kind: torch.Tensor,
                      draw: AugDraw) -> torch.Tensor:
        """All samples in one bucket: a single op kind, or scale/rotate mixed (sample_kind tells which)."""
        kind = OP_NAMES[bucket]
        if kind == "color":
            return batched_ops.color(x, draw.brightness[group], draw.saturation[group], draw.contrast[group])
        if kind == "crop":
            return batched_ops.crop(x, draw.crop[group])
        if kind == "cutout":
            return batched_ops.cutout(x, draw.cutout[group], draw.cutout_size)
        if kind == "flip":
            return batched_ops.flip(x, draw.flip[group])
        param_dtype = batched_ops.affine_param_dtype(x)
        scale_theta = batched_ops.scale_theta(draw.scale[group].to(param_dtype))
        rotate_theta = batched_ops.rotate_theta(draw.rotate[group].to(param_dtype))
        is_scale = (sample_kind == _KIND["scale"]).view(-1, 1, 1)
        return batched_ops.affine(x, torch.where(is_scale, scale_theta, rotate_theta))


def augment_per_sample(x: torch.Tensor, generator: torch.Generator | None = None,
                       strategy: str = STRATEGY_DEFAULT, param=None) -> torch.Tensor:
    """Evaluation-time DSA (reference Siamese=False): one op group per call, parameters per sample."""
    augmenter = SiameseAugment(strategy, param)
    _check_images("augment_per_sample", x)
    if not augmenter.ops or x.shape[0] == 0:
        return x
    draw = augmenter.draw(x.shape[0], tuple(x.shape[2:]), generator).with_single_op()
    group = torch.arange(x.shape[0], device=x.device)
    if augmenter.param.aug_mode == "S" and draw.device.type == "cpu":
        # A host draw names its one op without a device read: run that op alone (no masked buckets).
        kind = _KIND[augmenter.ops[int(draw.op_index[0])]]
        return augmenter._apply_bucket(min(kind, _AFFINE_BUCKET), x, group, torch.full_like(group, kind),
                                       draw.to(x.device)).contiguous()
    return augmenter.apply(x, group, draw)
