"""Reference-style DM step: the per-class loop of main_DM.py (one class at a time); test oracle and benchmark baseline."""
import torch

from fastdd.augment.reference_ops import apply_group


def reference_dm_loss(net, real_by_class, syn_images, ipc, draw):
    """Σ_c ‖mean(embed(DSA_c(real_c))).detach() − mean(embed(DSA_c(syn_c)))‖², DSA drawn per class."""
    loss = torch.tensor(0.0)
    for c, img_real in enumerate(real_by_class):
        img_syn = syn_images[c * ipc:(c + 1) * ipc]
        if draw is not None:
            img_real = apply_group(img_real, draw, c)
            img_syn = apply_group(img_syn, draw, c)
        output_real = net.embed(img_real).detach()
        output_syn = net.embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss
