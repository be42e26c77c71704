"""IDC's condense loop (pixel-space images, its DiffAug order, per-class optimiser steps, CutMix net training),
written from snu-mllab/Efficient-Dataset-Condensation's semantics with every random draw injected: the oracle."""
import math

import torch
import torch.nn.functional as F


# ---- IDC's DiffAug ops (augment.py), one draw per batch (scalars) or per sample ([N] tensors) ----------
def _per(v, x):
    return v.view(-1, 1, 1, 1).to(x.dtype) if torch.is_tensor(v) else v


def brightness_fn(x, randb):
    return x + (_per(randb, x) - 0.5) * 1.0


def saturation_fn(x, rands):
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (_per(rands, x) * 2.0) + x_mean


def contrast_fn(x, randc):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (_per(randc, x) + 0.5) + x_mean


def crop_fn(x, translation_x, translation_y):
    if torch.is_tensor(translation_x):
        translation_x, translation_y = translation_x.view(-1, 1, 1), translation_y.view(-1, 1, 1)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)),
                                                torch.arange(x.size(3)), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, (1, 1, 1, 1))
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def cutout_fn(x, offset_x, offset_y, ratio=0.5):
    if torch.is_tensor(offset_x):
        offset_x, offset_y = offset_x.view(-1, 1, 1), offset_y.view(-1, 1, 1)
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def diffaug(x, draw, rows=None):
    """IDC DiffAug.__call__ for strategies over color/crop/cutout: colour, then crop, then cutout.
    `draw` holds the injected values; `rows` picks one group (batch=True) or None for per-sample."""
    pick = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    if draw.color is not None:
        b, s, c = (pick(draw.color[:, i]) for i in range(3))
        x = contrast_fn(saturation_fn(brightness_fn(x, b), s), c)
    if draw.crop is not None:
        x = crop_fn(x, pick(draw.crop[:, 0]), pick(draw.crop[:, 1]))
    if draw.cutout is not None:
        x = cutout_fn(x, pick(draw.cutout[:, 0]), pick(draw.cutout[:, 1]))
    return x


# ---- the condense loop ------------------------------------------------------------------------
def decode_zoom(img, factor):
    """IDC Synthesizer.decode_zoom in pixel space (pad value 0.5, patch-major order)."""
    if factor == 1:
        return img
    h = img.shape[-1]
    if h % factor:
        img = F.pad(img, pad=(0, factor - h % factor, 0, factor - h % factor), value=0.5)
    s_crop = math.ceil(h / factor)
    cropped = [img[:, :, i * s_crop:(i + 1) * s_crop, j * s_crop:(j + 1) * s_crop]
               for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(cropped), size=(h, h), mode="bilinear", align_corners=False)


def matchloss(model, img_real, img_syn, lab_real, lab_syn, metric):
    params = list(model.parameters())
    g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(img_real), lab_real), params)]
    g_syn = torch.autograd.grad(F.cross_entropy(model(img_syn), lab_syn), params, create_graph=True)
    loss = None
    for gr, gs in zip(g_real, g_syn):
        if gr.dim() <= 2:  # IDC defaults bias=False, fc=False
            continue
        term = (gr - gs).pow(2).sum() if metric == "mse" else (gr - gs).abs().sum()
        loss = term if loss is None else loss + term
    return loss


def train_epoch(model, optimizer, batches, normalize, n_data):
    """IDC train_epoch: aug (normalise, per-sample DiffAug) under no_grad, CutMix with the injected draw."""
    num_exp = 0
    for raw, target, draw, mix in batches:
        with torch.no_grad():
            inp = diffaug(normalize(raw), draw)
        if mix is not None:
            h1, h2, w1, w2 = mix.box
            target_b = target[mix.perm]
            inp[:, :, h1:h2, w1:w2] = inp[mix.perm, :, h1:h2, w1:w2]
            ratio = 1 - ((h2 - h1) * (w2 - w1) / (inp.size()[-1] * inp.size()[-2]))
            output = model(inp)
            loss = F.cross_entropy(output, target) * ratio + F.cross_entropy(output, target_b) * (1. - ratio)
        else:
            loss = F.cross_entropy(model(inp), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_exp += len(target)
        if num_exp >= n_data:
            break


def condense(pixels, nclass, ipc, factor, mean, std, lr_img, mom_img, metric, iterations, n_data, net_args):
    """IDC condense(): `pixels` [C·ipc, ch, H, W] in [0, 1]; `iterations` is a list of outer iterations, each
    {"model": fresh net, "inner": [{"real": [(raw pixels, labels) per class], "draw": IDCDraw (per class),
    "net_batches": [(raw, labels, per-sample IDCDraw, CutMix draw or None), ...]}]}. Returns (data, loss)."""
    mean_t, std_t = (torch.tensor(v, dtype=pixels.dtype).view(1, -1, 1, 1) for v in (mean, std))
    normalize = lambda x: (x - mean_t) / std_t  # noqa: E731  (IDC's utils.Normalize)
    data = pixels.clone().requires_grad_(True)
    optim_img = torch.optim.SGD([data], lr=lr_img, momentum=mom_img)
    losses = []
    for outer in iterations:
        model = outer["model"]
        optim_net = torch.optim.SGD(model.parameters(), net_args["lr"], momentum=net_args["momentum"],
                                    weight_decay=net_args["weight_decay"])
        loss_total = 0.0
        data.data = torch.clamp(data.data, min=0., max=1.)
        for ot, inner in enumerate(outer["inner"]):
            for c in range(nclass):
                img, lab = inner["real"][c]
                img_syn = decode_zoom(data[ipc * c:ipc * (c + 1)], factor)
                lab_syn = torch.full((len(img_syn),), c, dtype=torch.long)
                n = img.shape[0]
                img_aug = diffaug(normalize(torch.cat([img, img_syn])), inner["draw"], rows=c)
                loss = matchloss(model, img_aug[:n], img_aug[n:], lab, lab_syn, metric)
                loss_total += loss.item()
                optim_img.zero_grad()
                loss.backward()
                optim_img.step()
            if ot < len(outer["inner"]) - 1:  # the net trained after the last step is discarded unused
                train_epoch(model, optim_net, inner["net_batches"], normalize, n_data)
        losses.append(loss_total / nclass / len(outer["inner"]))
    return data.detach(), losses
