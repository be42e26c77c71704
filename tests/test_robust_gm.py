"""Robust DD on GM: β = 0 is gm bit for bit; L_c, L_{c,k}, image gradient vs a per-cluster autograd loop; resume."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config

FAST = ["progress=false", "device=cpu", "batch_real=12", "ipc=2", "model=ConvNetW32", "iterations=2",
        "inner_loop=2", "n_data=24"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _engine(train, *overrides, method="robust"):
    return Distiller(build_config(overrides=[*FAST, f"method={method}", *overrides]), train, None)


def test_beta_zero_is_exactly_gm(digits):
    torch.set_num_threads(1)
    gm, rob = _engine(digits, method="gm"), _engine(digits, "base=gm", "beta=0", "k=3")
    assert rob.pixel_space and rob.lr == gm.lr
    gm.run()
    rob.run()
    assert torch.equal(gm.syn.images, rob.syn.images)
    assert torch.equal(gm.generator.get_state(), rob.generator.get_state())  # no clustering draws
    assert rob.method.cluster_ids is None and rob.method.reclusters == 0
    assert gm.history["loss"] == rob.history["loss"]


# ---- oracle: one autograd.grad per class and per (class, cluster) cell, brute-force RU CVaR -------------
def _ru_cvar(values: torch.Tensor, alpha: float) -> torch.Tensor:
    K = values.shape[0]
    return torch.stack([t + (values - t).clamp_min(0).sum() / (alpha * K) for t in values]).min()


def _distance(real, syn, distance):
    if distance == "idc":
        return sum((r - s).square().sum() for r, s in zip(real, syn))
    total = 0.0
    for r, s in zip(real, syn):  # DC's distance_wb: 1 − cos per output channel
        r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
        total = total + (1 - (r2 * s2).sum(1) / (r2.norm(dim=1) * s2.norm(dim=1) + 1e-6)).sum()
    return total


def _oracle(net, params, real, seg, cluster, syn, syn_seg, C, K, alpha, beta, distance):
    total, class_losses, losses = 0.0, torch.zeros(C, dtype=torch.float64), torch.zeros(C, K, dtype=torch.float64)

    def grad(x, c, create_graph):
        target = torch.full((x.shape[0],), c, dtype=torch.long)
        return torch.autograd.grad(F.cross_entropy(net(x), target), params, create_graph=create_graph)
    for c in range(C):
        g_syn = grad(syn[syn_seg == c], c, True)
        rows = seg == c
        l_c = _distance(grad(real[rows], c, False), g_syn, distance)
        cells = []
        for k in range(K):
            mine = rows & (cluster == k)
            if bool(mine.any()):  # empty (class, cluster) cells are excluded
                cells.append(_distance(grad(real[mine], c, False), g_syn, distance))
                losses[c, k] = cells[-1].detach()
        class_losses[c] = l_c.detach()
        total = total + (1 - beta) * l_c + beta * _ru_cvar(torch.stack(cells), alpha)
    return total, class_losses, losses


@pytest.mark.parametrize("distance,alpha,beta,chunk", [("idc", 0.5, 1.0, 0), ("cos", 0.4, 1.0, 0),
                                                        ("idc", 0.7, 0.3, 3)])
def test_losses_and_gradient_match_per_cluster_autograd_loop(digits, distance, alpha, beta, chunk):
    torch.set_num_threads(1)
    K, C = 3, 10
    engine = _engine(digits, "base=gm", f"beta={beta}", f"alpha={alpha}", f"k={K}", f"distance={distance}",
                     "factor=1", "aug=none", "batch_syn_max=0", "ipc=3", f"class_chunk={chunk}")
    m = engine.method
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 64, C, bias=False)).double()
    params = [net[0].weight] if distance == "idc" else [net[0].weight, net[3].weight]
    index, seg = engine.sample_real_index(12)
    real_images = engine.real_images
    engine.real_images = lambda i: real_images(i).double()
    engine.new_network = lambda *a, **k: net
    engine.sample_real_index = lambda *a, **k: (index, seg)
    engine.synthetic.images = engine.synthetic.images.detach().double().requires_grad_(True)
    m.cluster_ids = torch.randint(0, K, (len(engine.train),), generator=torch.Generator().manual_seed(1))
    m.cluster_ids[index[seg == 4]] = 1  # class 4: clusters 0 and 2 empty in this batch
    m.clustered_at = 1
    state = m.begin_iteration(engine, 1)
    out = m.compute_inner(engine, 1, state, 0)
    _, class_losses, losses, present = m.gm_match(engine, state.grads, index, seg, None, None)

    cluster = m.cluster_ids[index]
    syn = engine.synthetic.images
    ref, ref_class, ref_losses = _oracle(net, params, engine.real_images(index), seg, cluster, syn,
                                         engine.syn.seg, C, K, alpha, beta, distance)
    expect_present = torch.stack([torch.stack([((seg == c) & (cluster == k)).any() for k in range(K)])
                                  for c in range(C)])
    assert torch.equal(present, expect_present) and int((~present).sum()) >= 2
    assert out.logs["empty_cells"] == int((~expect_present).sum())
    torch.testing.assert_close(class_losses, ref_class, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(float(out.value) * C, float(ref.detach()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.grad, torch.autograd.grad(ref, syn)[0], rtol=1e-9, atol=1e-12)
    assert out.sequential_by_class


def test_one_cluster_full_risk_is_gm_with_decoding_and_augmentation(digits):
    # K = 1, β = 1: L_{c,0} = L_c and CVaR of one value is that value, so the step is gm's step (factor 2,
    # IDC augmentation and the synthetic selection drawn as gm draws them)
    torch.set_num_threads(1)
    extra = ["batch_syn_max=4", "ipc=3"]
    gm, rob = _engine(digits, *extra, method="gm"), _engine(digits, *extra, "base=gm", "beta=1", "k=1", "alpha=0.3")
    rob.method.cluster_ids = torch.zeros(len(digits), dtype=torch.long)
    rob.method.clustered_at = 0
    outs = []
    for engine in (gm, rob):
        engine.method.prepare(engine)
        state = engine.method.begin_iteration(engine, 1)
        outs.append(engine.method.compute_inner(engine, 1, state, 0))
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(outs[1].value, outs[0].value, rtol=1e-5, atol=0)
    assert outs[1].logs["empty_cells"] == 0 and outs[1].logs["cvar"] == pytest.approx(float(outs[0].value) * 10, rel=1e-5)
    assert torch.equal(gm.generator.get_state(), rob.generator.get_state())


def test_resume_with_gm_base_is_bit_identical(digits):
    torch.set_num_threads(1)
    over = ["base=gm", "beta=0.5", "iterations=4", "recluster_every=3", "k=2", "checkpoint_every=0"]
    saved = {}

    def grab(engine, logs):
        if engine.iteration == 2:
            buf = io.BytesIO()
            torch.save(engine.state_dict(), buf)
            saved["state"] = buf.getvalue()

    straight = _engine(digits, *over)
    straight.run(callback=grab)
    resumed = _engine(digits, *over)
    resumed.load_state_dict(torch.load(io.BytesIO(saved["state"]), weights_only=False))
    resumed.run()
    assert resumed.method.reclusters == straight.method.reclusters == 2  # iterations 0 and 3
    assert torch.equal(resumed.method.cluster_ids, straight.method.cluster_ids)
    assert torch.equal(resumed.syn.images, straight.syn.images)
