"""Tests for fastdd.augment: batched siamese DSA against reference-style single-group ops."""
import math

import pytest
import torch

from fastdd.augment import (OP_NAMES, STRATEGY_DEFAULT, AugDraw, ParamDiffAug, SiameseAugment,
                            augment_per_sample)
from fastdd.augment import reference_ops as ref

SHAPES = [(1, 7, 7), (3, 7, 7), (1, 28, 28), (3, 28, 28), (3, 32, 32), (3, 9, 7)]


def _gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _images(n, shape, seed=1, dtype=torch.float32):
    return torch.randn(n, *shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _groups(n, num_groups, seed=2):
    ids = torch.arange(n) % num_groups
    return ids[torch.randperm(n, generator=_gen(seed))]


def _per_group_reference(x, group, draw, aug_mode="S"):
    out = torch.empty_like(x)
    for g in range(draw.num_groups):
        members = group == g
        if members.any():
            out[members] = ref.apply_group(x[members], draw, g, aug_mode)
    return out


def test_param_defaults_match_reference():
    p = ParamDiffAug()
    assert (p.aug_mode, p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad, p.ratio_cutout,
            p.brightness, p.saturation, p.contrast) == ("S", 0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5)
    assert STRATEGY_DEFAULT == "color_crop_cutout_flip_scale_rotate"


@pytest.mark.parametrize("size, shift, cut", [((32, 32), 4, 16), ((28, 28), 4, 14), ((7, 7), 1, 4),
                                              ((10, 10), 1, 5)])
def test_draw_distributions(size, shift, cut):
    n = 6000
    d = SiameseAugment().draw(n, size, _gen(3))
    counts = torch.bincount(d.op_index, minlength=6).double()
    assert counts.min() > 0.85 * n / 6 and counts.max() < 1.15 * n / 6
    for values, low, high, mean in [(d.brightness, -0.5, 0.5, 0.0), (d.saturation, 0.0, 2.0, 1.0),
                                    (d.contrast, 0.5, 1.5, 1.0),
                                    (d.scale, 1 / 1.2, 1.2, (1.2 + 1 / 1.2) / 2),
                                    (d.rotate, -math.pi / 12, math.pi / 12, 0.0)]:
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6
        assert abs(values.double().mean().item() - mean) < 0.03 * (high - low)
        assert values.min() < low + 0.02 * (high - low) and values.max() > high - 0.02 * (high - low)
    assert abs(d.flip.double().mean().item() - 0.5) < 0.03
    assert d.crop.dtype == torch.int64 and d.cutout.dtype == torch.int64
    assert set(d.crop.unique().tolist()) == set(range(-shift, shift + 1))
    assert abs(d.crop.double().mean().item()) < 0.1
    offsets = d.cutout.unique().tolist()  # reference: randint(0, side + (1 - cut % 2))
    assert d.cutout_size == (cut, cut)
    assert offsets == list(range(0, size[0] + (1 - cut % 2)))


def test_scale_and_rotate_formulas_follow_reference():
    u = torch.rand(5, 12, generator=_gen(4), dtype=torch.float64)
    d = SiameseAugment().draw(5, 32, _gen(4))
    torch.testing.assert_close(d.scale.double(), u[:, 9:11] * (1.2 - 1 / 1.2) + 1 / 1.2, atol=1e-6, rtol=0)
    torch.testing.assert_close(d.rotate.double(), (u[:, 11] - 0.5) * 2 * 15.0 / 180 * math.pi, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", list(OP_NAMES) + [STRATEGY_DEFAULT, "scale_rotate"])
def test_batched_equals_per_group_reference(shape, strategy):
    num_groups = 12
    aug = SiameseAugment(strategy)
    x = _images(40, shape)
    group = _groups(40, num_groups)
    draw = aug.draw(num_groups, shape[1:], _gen(5))
    # color folds its three steps into one pass: equal up to float32 rounding
    torch.testing.assert_close(aug.apply(x, group, draw), _per_group_reference(x, group, draw),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("height, width", [(7, 7), (9, 7), (32, 32)])
def test_affine_grid_matches_torch(height, width):
    from fastdd.augment.batched_ops import affine_grid
    theta = torch.randn(5, 2, 3, generator=_gen(21))
    expected = torch.nn.functional.affine_grid(theta, [5, 1, height, width], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, height, width), expected, atol=1e-6, rtol=0)


def test_mode_m_applies_every_op_in_order():
    aug = SiameseAugment(param=ParamDiffAug(aug_mode="M"))
    x, group = _images(20, (3, 11, 11)), _groups(20, 4)
    draw = aug.draw(4, (11, 11), _gen(6))
    torch.testing.assert_close(aug.apply(x, group, draw), _per_group_reference(x, group, draw, "M"),
                               atol=1e-5, rtol=0)


def test_reference_ops_spot_values():
    x = _images(2, (3, 8, 8))
    shifted = ref.crop(x, 2, -1)  # out[i, j] = x[i + 2, j - 1], zero outside
    assert torch.equal(shifted[:, :, :6, 1:], x[:, :, 2:, :7])
    assert shifted[:, :, 6:].abs().sum() == 0 and shifted[:, :, :, 0].abs().sum() == 0
    holed = ref.cutout(x, 3, 3, (4, 4))  # rows/cols [1, 5)
    assert holed[:, :, 1:5, 1:5].abs().sum() == 0
    assert torch.equal(holed[:, :, 5:], x[:, :, 5:]) and torch.equal(holed[:, :, :1], x[:, :, :1])
    corner = ref.cutout(x, 0, 8, (4, 4))  # clamped at the border: rows [0, 2), cols [6, 8)
    assert (corner == 0).sum() == 2 * 3 * 4
    torch.testing.assert_close(ref.scale(x, 1.0, 1.0), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.rotate(x, 0.0), x, atol=1e-6, rtol=0)
    assert torch.equal(ref.flip(x, True), x.flip(3))
    c = ref.color(x, 0.25, 0.0, 1.0)  # zero saturation: every channel equals the pixel mean
    torch.testing.assert_close(c, (x + 0.25).mean(1, keepdim=True).expand_as(x))


@pytest.mark.parametrize("strategy", list(OP_NAMES) + [STRATEGY_DEFAULT])
def test_siamese_same_group_same_transform_across_calls(strategy):
    aug = SiameseAugment(strategy)
    num_groups = 7
    draw = aug.draw(num_groups, (28, 28), _gen(7))
    real = _images(45, (1, 28, 28), seed=8)
    real_group = _groups(45, num_groups)
    syn_group = torch.arange(num_groups).repeat_interleave(2)
    syn = torch.stack([real[real_group == g][0] for g in syn_group.tolist()])
    out_real = aug.apply(real, real_group, draw)
    out_syn = aug.apply(syn, syn_group, draw)
    expected = torch.stack([out_real[real_group == g][0] for g in syn_group.tolist()])
    torch.testing.assert_close(out_syn, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", ["color", "scale", "rotate", "crop", "cutout", "flip", STRATEGY_DEFAULT])
def test_gradcheck_float64(strategy):
    aug = SiameseAugment(strategy)
    draw = aug.draw(3, (5, 6), _gen(9))
    group = torch.tensor([0, 1, 2, 1])
    x = _images(4, (2, 5, 6), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, group, draw), (x,))


def test_grad_reaches_input_through_apply():
    aug = SiameseAugment()
    x = _images(30, (3, 32, 32)).requires_grad_()
    aug(x, _groups(30, 10), 10, _gen(10)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_reproducible_from_seeded_generator():
    aug = SiameseAugment()
    x, group = _images(30, (3, 16, 16)), _groups(30, 10)
    torch.testing.assert_close(aug(x, group, 10, _gen(11)), aug(x, group, 10, _gen(11)), atol=0, rtol=0)
    assert not torch.equal(aug(x, group, 10, _gen(11)), aug(x, group, 10, _gen(12)))
    torch.testing.assert_close(augment_per_sample(x, _gen(13)), augment_per_sample(x, _gen(13)), atol=0, rtol=0)
    state = torch.get_rng_state()
    aug(x, group, 10)  # no generator: a private OS-seeded one, global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


def test_groups_draw_independently():
    d = SiameseAugment().draw(50, 32, _gen(14))
    for field in ("brightness", "saturation", "contrast", "rotate"):
        assert getattr(d, field).unique().numel() == 50
    assert d.op_index.unique().numel() == 6


def test_per_sample_mode_one_op_per_call_params_per_sample():
    x = _images(1, (3, 12, 12)).expand(16, -1, -1, -1).contiguous()
    color_out = augment_per_sample(x, _gen(15), strategy="color")
    assert color_out.flatten(1).unique(dim=0).shape[0] == 16
    for seed in range(30):
        out = augment_per_sample(x, _gen(seed), strategy="flip_color")
        untouched = [(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(2))) for o in out]
        assert all(untouched) or not any(untouched)
    draw = SiameseAugment().draw(16, 12, _gen(16)).with_single_op()
    assert draw.op_index.unique().numel() == 1 and draw.brightness.unique().numel() == 16


@pytest.mark.parametrize("strategy", [STRATEGY_DEFAULT, "crop_scale", "rotate"])
@pytest.mark.parametrize("aug_mode", ["S", "M"])
def test_per_sample_host_op_shortcut_equals_the_general_path(strategy, aug_mode):
    param = ParamDiffAug(aug_mode=aug_mode)
    aug = SiameseAugment(strategy, param)
    x = _images(12, (3, 10, 10))
    for seed in range(8):
        draw = aug.draw(12, 10, _gen(seed)).with_single_op()
        expected = aug.apply(x, torch.arange(12), draw)
        assert torch.equal(augment_per_sample(x, _gen(seed), strategy, param), expected)


@pytest.mark.parametrize("strategy", ["none", "None", "", None])
def test_identity_strategy(strategy):
    x = _images(4, (3, 8, 8))
    aug = SiameseAugment(strategy)
    assert torch.equal(aug(x, torch.zeros(4, dtype=torch.int64), 1, _gen(0)), x)
    assert torch.equal(augment_per_sample(x, _gen(0), strategy=strategy), x)


def test_empty_batch_and_draw_to():
    aug = SiameseAugment()
    draw = aug.draw(3, 8, _gen(17))
    assert isinstance(draw, AugDraw) and draw.to("cpu") is draw
    empty = torch.empty(0, 3, 8, 8)
    assert aug.apply(empty, torch.empty(0, dtype=torch.int64), draw).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.1)])
def test_dtypes(dtype, atol):
    aug = SiameseAugment()
    x, group = _images(40, (3, 16, 16)), _groups(40, 12)
    draw = aug.draw(12, 16, _gen(18))
    out = aug.apply(x.to(dtype), group, draw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), aug.apply(x, group, draw), atol=atol, rtol=0.02)


def test_bad_inputs_name_the_argument():
    aug = SiameseAugment()
    x, group = _images(4, (3, 8, 8)), torch.tensor([0, 1, 2, 0])
    draw = aug.draw(3, 8, _gen(0))
    with pytest.raises(ValueError, match="x must be 4-D"):
        aug.apply(x[0], group, draw)
    with pytest.raises(TypeError, match="x must be floating"):
        aug.apply(x.long(), group, draw)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, num_groups=3\)"):
        aug.apply(x, torch.tensor([0, 1, 3, 0]), draw)
    with pytest.raises(ValueError, match="group ids"):
        aug.apply(x, torch.tensor([0, -1, 2, 0]), draw)
    with pytest.raises(ValueError, match="group must be 1-D"):
        aug.apply(x, group[:3], draw)
    with pytest.raises(TypeError, match="group must be an integer"):
        aug.apply(x, group.float(), draw)
    with pytest.raises(ValueError, match="draw was made for image_size"):
        aug.apply(_images(4, (3, 9, 9)), group, draw)
    with pytest.raises(ValueError, match="num_groups"):
        aug.draw(0, 8)
    with pytest.raises(ValueError, match="unknown op.*valid names: color, crop, cutout, flip, scale, rotate"):
        SiameseAugment("color_blur")
    with pytest.raises(ValueError, match="unknown op"):
        augment_per_sample(x, _gen(0), strategy="jitter")
    with pytest.raises(ValueError, match="aug_mode"):
        SiameseAugment(param=ParamDiffAug(aug_mode="X"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    aug = SiameseAugment()
    x, group = _images(64, (3, 32, 32)), _groups(64, 10)
    draw = aug.draw(10, 32, _gen(19))
    out = aug.apply(x.cuda(), group.cuda(), draw)
    torch.testing.assert_close(out.cpu(), aug.apply(x, group, draw), atol=1e-5, rtol=0)
    per_sample = augment_per_sample(x.cuda(), _gen(20, "cuda"))
    assert per_sample.device.type == "cuda" and per_sample.shape == x.shape


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op called, to spot host reads (_local_scalar_dense) and data-dependent shapes."""

    HOST_SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount",
                    "repeat_interleave", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", [STRATEGY_DEFAULT, "scale_rotate", "crop_flip", "color"])
def test_masked_gpu_path_equals_sorted_cpu_path_values_and_grads(strategy):
    aug = SiameseAugment(strategy)
    x, group = _images(60, (3, 12, 12)), _groups(60, 10)
    draw = aug.draw(10, 12, _gen(21))
    cotangent = _images(60, (3, 12, 12), seed=22)
    x_sorted, x_masked = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_sorted = aug._apply_sorted_by_bucket("t", x_sorted, group, draw)
    out_masked = aug._apply_masked(x_masked, group, draw)
    assert torch.equal(out_masked, out_sorted)
    out_sorted.backward(cotangent)
    out_masked.backward(cotangent)
    assert torch.equal(x_masked.grad, x_sorted.grad)


def test_masked_gpu_path_reads_nothing_back_to_the_host(monkeypatch):
    aug = SiameseAugment()
    x, group = _images(30, (3, 10, 10)), _groups(30, 10)
    draw = aug.draw(10, 10, _gen(23))
    with _RecordOps() as sorted_path:
        aug._apply_sorted_by_bucket("t", x, group, draw)
    assert "bincount" in sorted_path.names  # the recorder does see the data-dependent ops

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor")
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with _RecordOps() as masked:
        aug._apply_masked(x, group, draw)
    monkeypatch.undo()
    assert "grid_sampler_2d" in masked.names and "gather" in masked.names
    assert not _RecordOps.HOST_SYNCING & set(masked.names)


def test_packed_draw_copy_is_exact():
    from fastdd.augment.draw import _packed_copy_to
    draw = SiameseAugment().draw(7, 32, _gen(24))
    names = ["op_index", "brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate"]
    moved = _packed_copy_to(torch.device("cpu"), {name: getattr(draw, name) for name in names})
    for name in names:
        original = getattr(draw, name)
        assert moved[name].dtype == original.dtype and torch.equal(moved[name], original), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_siamese_apply_has_no_host_sync():
    aug = SiameseAugment()
    x, group = _images(64, (3, 32, 32)).cuda(), _groups(64, 10).cuda()
    aug.apply(x, group, aug.draw(10, 32, _gen(25), device="cuda"))  # warm caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        draw = aug.draw(10, 32, _gen(26), device="cuda")
        out = aug.apply(x, group, draw)
        per_sample = augment_per_sample(x, _gen(27, "cuda"))  # device draw: the masked path
        per_sample_host_draw = augment_per_sample(x, _gen(28))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out.cpu(), aug.apply(x.cpu(), group.cpu(), draw.to("cpu")), atol=1e-5, rtol=0)
    assert per_sample.shape == x.shape
    torch.testing.assert_close(per_sample_host_draw.cpu(), augment_per_sample(x.cpu(), _gen(28)), atol=1e-5, rtol=0)
