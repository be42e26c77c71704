"""A gradient-matching outer iteration written like IDC's condense.py (one class at a time), the test oracle."""
import torch
import torch.nn.functional as F

from fastdd.augment import augment_per_sample
from fastdd.augment.reference_ops import apply_group


def distance_wb(gwr, gws):
    """DC's distance_wb (gm distance=cos): 1 − cosine per output row; 1-D parameters contribute 0."""
    shape = gwr.shape
    if len(shape) == 1:
        return torch.zeros((), dtype=gwr.dtype)
    gwr, gws = gwr.reshape(shape[0], -1), gws.reshape(shape[0], -1)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))


def match_loss(g_real, g_syn, distance):
    loss = None
    for gr, gs in zip(g_real, g_syn):
        if distance == "cos":
            term = distance_wb(gr, gs)
        elif len(gr.shape) <= 2:  # IDC defaults: bias=False, fc=False
            continue
        elif distance == "idc":
            term = (gr - gs).pow(2).sum()
        else:
            term = (gr - gs).abs().sum()
        loss = term if loss is None else loss + term
    return loss


def reference_match_step(net, engine, real_index, real_seg, draw, select, optimizer, decode, distance,
                         step_per_class=True):
    """For every class: real gradient (detached), synthetic gradient (create_graph), distance, and an
    optimiser step on the images (IDC), or one summed step at the end (DC)."""
    params = list(net.parameters())
    ipc, images = engine.syn.ipc, engine.syn.images
    real_all = engine.real_images(real_index)
    total = None
    for c in range(engine.num_classes):
        img_real = real_all[real_seg == c]
        lab = torch.full((len(img_real),), c, dtype=torch.long)
        img_syn, lab_syn = decode(images[c * ipc:(c + 1) * ipc], torch.full((ipc,), c, dtype=torch.long))
        if select is not None:
            img_syn, lab_syn = img_syn[select[c]], lab_syn[select[c]]
        if draw is not None:
            img_real, img_syn = apply_group(img_real, draw, c), apply_group(img_syn, draw, c)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(img_real), lab), params)]
        g_syn = torch.autograd.grad(F.cross_entropy(net(img_syn), lab_syn), params, create_graph=True)
        loss = match_loss(g_real, g_syn, distance)
        if step_per_class:
            optimizer.zero_grad()
            images.grad = torch.autograd.grad(loss, images)[0]
            optimizer.step()
        else:
            total = loss if total is None else total + loss
    if not step_per_class:
        optimizer.zero_grad()
        images.grad = torch.autograd.grad(total, images)[0]
        optimizer.step()


def reference_train_epoch(net, engine, optimizer, n_data, batch):
    """IDC train_epoch on real data with per-sample DSA, stopping after n_data samples (no CutMix)."""
    batch = batch or engine.config.batch_real  # net_batch 0: the shared loader's batch_real, as fastdd's gm
    order = torch.randperm(len(engine.train), generator=engine.generator)
    seen = 0
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        x = augment_per_sample(engine.real_images(index), engine.generator, strategy=engine.config.dsa_strategy)
        loss = F.cross_entropy(net(x), torch.as_tensor(engine.train.labels)[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(index)
        if seen >= n_data:
            break


def reference_iteration(engine, args, decode, **net_overrides):
    """One outer iteration with the same engine RNG draws, in the same order, as fastdd's gm; `net_overrides`
    go to engine.new_network (fused=False: the references' nn modules, same weights)."""
    net = engine.new_network(**net_overrides)
    for p in net.parameters():
        p.requires_grad_(True)
    opt_net = torch.optim.SGD(net.parameters(), lr=args.net_lr, momentum=args.net_momentum,
                              weight_decay=args.net_weight_decay)
    per_class = engine.syn.ipc * args.factor ** 2
    for inner in range(args.inner_loop):
        real_index, real_seg = engine.sample_real_index(engine.config.batch_real)
        draw = engine.draw_augmentation()
        select = None
        if args.batch_syn_max and per_class > args.batch_syn_max:
            keys = torch.rand(engine.num_classes, per_class, generator=engine.generator)
            select = keys.argsort(1)[:, :args.batch_syn_max]
        reference_match_step(net, engine, real_index, real_seg, draw, select, engine.optimizer, decode,
                             args.distance, args.step_per_class)
        if inner < args.inner_loop - 1:
            reference_train_epoch(net, engine, opt_net, args.n_data, args.net_batch)
