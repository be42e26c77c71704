"""fastdd.compat: reference call signatures; a reference-style DM loop gets the same loss with either."""
import pytest
import torch

from fastdd.compat import DiffAugment, ParamDiffAug, dm_class_loss
from fastdd.models import get_model
from reference_diffaugment import diff_augment as reference_diff_augment

STRATEGIES = ["color", "crop", "cutout", "flip", "scale", "rotate", "color_crop_cutout_flip_scale_rotate"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [3, 1234, -1])
def test_diffaugment_matches_reference_semantics(strategy, seed):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(99)
    expected = reference_diff_augment(x.clone(), strategy, seed, ParamDiffAug())
    torch.manual_seed(99)
    got = DiffAugment(x.clone(), strategy, seed, ParamDiffAug())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffaugment_is_differentiable_and_none_is_identity():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    DiffAugment(x, "scale_rotate", 5, ParamDiffAug()).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert DiffAugment(x, "none", 1) is x


def _reference_style_loop(net, real_by_class, syn_by_class, strategy, seeds, augment):
    loss = torch.tensor(0.0)
    param = ParamDiffAug()
    for c in range(len(real_by_class)):
        img_real = augment(real_by_class[c], strategy, seeds[c], param)
        img_syn = augment(syn_by_class[c], strategy, seeds[c], param)
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss


@pytest.mark.parametrize("strategy", ["color_crop_cutout_flip_scale_rotate", "none"])
def test_reference_dm_loop_same_loss_with_either_import(strategy):
    torch.manual_seed(0)
    net = get_model("ConvNetD2", 1, 4, 16)
    g = torch.Generator().manual_seed(1)
    real = [torch.randn(9, 1, 16, 16, generator=g) for _ in range(4)]
    syn = [torch.randn(3, 1, 16, 16, generator=g).requires_grad_(True) for _ in range(4)]
    seeds = [17, 4242, 5, 999]
    ref = _reference_style_loop(net, real, syn, strategy, seeds, reference_diff_augment)
    swapped = _reference_style_loop(net, real, syn, strategy, seeds, DiffAugment)
    batched = dm_class_loss(net.embed, real, syn, strategy, seeds)
    torch.testing.assert_close(swapped, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched, ref, rtol=1e-4, atol=1e-6)
    g_ref = torch.autograd.grad(ref, syn)
    g_batched = torch.autograd.grad(batched, syn)
    for a, b in zip(g_batched, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_dm_class_loss_bad_input():
    with pytest.raises(ValueError, match="images_real has 2 classes, images_syn 1"):
        dm_class_loss(lambda t: t, [torch.ones(1, 2)] * 2, [torch.ones(1, 2)])
    with pytest.raises(ValueError, match="seeds must give one seed per class"):
        dm_class_loss(lambda t: t, [torch.ones(1, 1, 4, 4)], [torch.ones(1, 1, 4, 4)], "flip", seeds=None)
