"""DM's shared pieces: dm_class_losses by hand, and dm_batch's ONE siamese draw for the real and synthetic images."""
import torch

from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.methods.dm import DM, dm_class_losses
from fastdd.reference.dm_loop import reference_dm_loss


def test_dm_class_losses_by_hand():
    real = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    real_seg = torch.tensor([0, 0, 1, 2])  # class 2 has no synthetic rows: zero loss
    syn = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], requires_grad=True)
    syn_seg = torch.tensor([0, 1, 1])
    losses = dm_class_losses(real, real_seg, syn, syn_seg, 3)
    # class 0: μ_real (1, 0) = μ_syn; class 1: μ_real (1, 1), μ_syn (0, 1) -> 1
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.0, 0.0]))
    (grad,) = torch.autograd.grad(losses.sum(), syn)  # −2·(μ_real − μ_syn)/n_syn on class 1's rows
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]))


def test_dm_step_uses_one_siamese_draw_for_real_and_synthetic():
    digits = load_dataset("digits")
    cfg = build_config(overrides=["device=cpu", "progress=false", "batch_real=8", "ipc=2", "model=ConvNetD2",
                                  "dsa_strategy=color_crop_cutout_flip_scale_rotate", "seed=3"])
    engine = Distiller(cfg, digits)
    net = engine.new_network()
    index, seg = engine.sample_real_index(8)
    engine.new_network = lambda *a, **k: net
    engine.sample_real_index = lambda *a, **k: (index, seg)
    draws, draw_augmentation = [], engine.draw_augmentation
    engine.draw_augmentation = lambda: draws.append(draw_augmentation()) or draws[-1]
    out = DM().compute(engine, 0)
    assert len(draws) == 1
    real = engine.real_images(index)
    expected = reference_dm_loss(net, [real[seg == c] for c in range(10)], engine.syn.images, 2, draws[0])
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
