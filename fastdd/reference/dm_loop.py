"""Reference-style DM step: main_DM.py's per-class loop (and its all-classes pass for BN nets); test oracle and benchmark baseline."""
import torch

from fastdd.augment.reference_ops import apply_group


def _augmented(images, draw, c):
    return images if draw is None else apply_group(images, draw, c)


def reference_dm_loss(net, real_by_class, syn_images, ipc, draw):
    """Σ_c ‖mean(embed(DSA_c(real_c))).detach() − mean(embed(DSA_c(syn_c)))‖², one class per forward pass."""
    loss = syn_images.new_zeros(())
    for c, img_real in enumerate(real_by_class):
        img_real = _augmented(img_real, draw, c)
        img_syn = _augmented(syn_images[c * ipc:(c + 1) * ipc], draw, c)
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss


def reference_dm_loss_batchnorm(net, real_by_class, syn_images, ipc, draw):
    """main_DM.py's branch for BN nets: DSA per class, then ONE forward pass of all classes' real images and
    one of all synthetic images (batch statistics over every class), per-class means of the features."""
    real_all = torch.cat([_augmented(img_real, draw, c) for c, img_real in enumerate(real_by_class)])
    syn_all = torch.cat([_augmented(syn_images[c * ipc:(c + 1) * ipc], draw, c)
                         for c in range(len(real_by_class))])
    output_real = net.embed(real_all).detach().split([len(img_real) for img_real in real_by_class])
    output_syn = net.embed(syn_all).split(ipc)
    loss = syn_images.new_zeros(())
    for feats_real, feats_syn in zip(output_real, output_syn):
        loss = loss + torch.sum((feats_real.mean(0) - feats_syn.mean(0)) ** 2)
    return loss
