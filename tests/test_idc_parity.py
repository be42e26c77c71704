"""gm against IDC's own loop (pixel-space oracle with injected draws), IDC's aug ops, the engine's pixel-space
step, clamp and closed-form sequential class steps, and the CUDA / bf16 variants."""
import copy

import pytest
import torch

import fastdd.distill.methods.gm as gm_module
from idc_reference_loop import condense, diffaug
from fastdd.augment.idc import IDCAugment
from fastdd.data import from_tensors, load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.synthetic import lookahead_coefficients, sequential_class_update

FAST = ["progress=false", "eval_epochs=2", "eval_num_models=1", "batch_real=8", "method=gm", "model=ConvNetW32",
        "eval_models=[ConvNetW32]", "ipc=2", "inner_loop=2", "n_data=16"]


@pytest.fixture(scope="module")
def three():
    d = load_dataset("digits")
    keep = torch.as_tensor(d.labels) < 3
    return from_tensors(d.images[keep], torch.as_tensor(d.labels)[keep], name="digits3", num_classes=3)


def _recorded_engine(data, overrides, dtype, events):
    """A gm engine in `dtype` whose networks and random draws are logged, in call order, into `events`."""
    engine = Distiller(build_config(overrides=[*FAST, *overrides]), data)
    engine.synthetic.images = engine.synthetic.images.detach().to(dtype).requires_grad_(True)
    engine.optimizer = torch.optim.SGD([engine.synthetic.images], lr=engine.lr, momentum=engine.config.momentum)
    method = engine.method
    new_network, sample = engine.new_network, engine.sample_real_index

    def spy_network(*a, **k):
        net = new_network(*a, **k).to(dtype)
        events.append(("net", copy.deepcopy(net)))
        return net

    def spy_sample(*a, **k):
        out = sample(*a, **k)
        events.append(("sample", out))
        return out

    def spy_real(index):
        events.append(("real", index))
        return data.normalize(data.images[index.cpu()], device=engine.device, dtype=dtype)

    def spy(kind, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            events.append((kind, out))
            return out
        return wrapped
    engine.new_network, engine.real_images, engine.sample_real_index = spy_network, spy_real, spy_sample
    method.match_aug.draw = spy("matchdraw", method.match_aug.draw)
    method.net_aug.draw = spy("netdraw", method.net_aug.draw)
    return engine, spy("cutmix", gm_module.draw_cutmix)


def _oracle_iterations(events, train, num_classes, dtype):
    """The logged draws arranged as idc_reference_loop.condense takes them (raw pixels, IDC's labels)."""
    pixels = lambda index: train.images[index.cpu()].to(dtype) / 255  # noqa: E731
    labels = torch.as_tensor(train.labels)
    iterations, pending, batches = [], None, None
    for kind, value in events:
        if kind == "net":
            model = value.cpu()
            for p in model.parameters():
                p.requires_grad_(True)
            iterations.append({"model": model, "inner": []})
        elif kind == "sample":
            index, seg = value
            seg = seg.cpu()
            real = [(pixels(index[seg == c]), torch.full((int((seg == c).sum()),), c)) for c in range(num_classes)]
            iterations[-1]["inner"].append({"real": real, "draw": None, "net_batches": []})
        elif kind == "matchdraw":
            iterations[-1]["inner"][-1]["draw"] = value
        elif kind == "real":
            pending = value
        elif kind == "netdraw":
            batches = iterations[-1]["inner"][-1]["net_batches"]
            batches.append((pixels(pending), labels[pending.cpu()], value, None))
        elif kind == "cutmix":
            batches[-1] = (*batches[-1][:3], value)
    return iterations


@pytest.mark.parametrize("extra,metric", [(["distance=idc", "mix_p=1.0"], "mse"),
                                          (["distance=idc_l1", "factor=1", "mixup_net=vanilla"], "l1")])
def test_gm_equals_idc_condense_loop(three, monkeypatch, extra, metric):
    """Two outer iterations at gm's default lr against IDC's loop in pixel space with lr_img = 5e-3·ipc/10:
    the fastdd images (normalised) mapped to pixels equal IDC's, and so do the logged losses."""
    events = []
    engine, cutmix_spy = _recorded_engine(three, ["device=cpu", *extra], torch.float64, events)
    monkeypatch.setattr(gm_module, "draw_cutmix", cutmix_spy)
    engine.method.prepare(engine)
    mean = torch.tensor(three.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(three.std, dtype=torch.float64).view(1, -1, 1, 1)
    start = engine.synthetic.images.detach() * std + mean
    events.clear()
    losses = [engine.run_iteration(it)["loss"] for it in range(2)]
    assert any(kind == "cutmix" and value is not None for kind, value in events) == ("mix_p=1.0" in extra)
    assert any(kind == "netdraw" and (value.cutout is not None) for kind, value in events) == ("mix_p=1.0" not in extra)
    a = engine.method.args
    ref, ref_losses = condense(start, 3, 2, a.factor, three.mean, three.std, lr_img=5e-3 * 2 / 10, mom_img=0.5,
                               metric=metric, iterations=_oracle_iterations(events, three, 3, torch.float64),
                               n_data=a.n_data, net_args={"lr": a.net_lr, "momentum": a.net_momentum,
                                                          "weight_decay": a.net_weight_decay})
    ref = ref.clamp(0, 1)  # fastdd also clamps after the last iteration (IDC only at the next one's top)
    ours = engine.synthetic.images.detach() * std + mean
    moved = (ref - start).abs().max()
    assert moved > 1e-4
    torch.testing.assert_close(ours - start, ref - start, rtol=0, atol=1e-9 * float(moved) + 1e-13)
    assert losses == pytest.approx(ref_losses, rel=1e-9)


@pytest.mark.parametrize("groups", [1, 5])
def test_idc_augment_equals_idc_diffaug_ops(groups):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    aug = IDCAugment("cutout_color_crop")  # IDC's order is fixed: colour, crop, cutout
    for seed in range(20):
        draw = aug.draw(groups, (9, 8), torch.Generator().manual_seed(seed))
        group = torch.zeros(5, dtype=torch.long) if groups == 1 else torch.arange(5)
        ref = diffaug(x, draw, rows=0) if groups == 1 else diffaug(x, draw)
        torch.testing.assert_close(aug.apply(x, group, draw), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_buffer", [False, True])
def test_sequential_class_update_equals_a_literal_loop_of_class_steps(with_buffer):
    torch.manual_seed(0)
    C, ipc, lr, m = 4, 3, 0.3, 0.7
    row_class = torch.arange(C).repeat_interleave(ipc)
    images = torch.randn(C * ipc, 2, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(images)
    buf = torch.randn_like(images) if with_buffer else None
    leaf = images.clone().requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=lr, momentum=m)
    if with_buffer:
        opt.state[leaf]["momentum_buffer"] = buf.clone()
    coef = lookahead_coefficients(C, m)
    for c in range(C):
        rows = row_class == c
        if with_buffer:  # the closed-form lookahead: where class c's rows stand when its step comes
            expected = images[rows] - lr * coef[c] * buf[rows]
            torch.testing.assert_close(leaf.detach()[rows], expected, rtol=1e-13, atol=1e-13)
        leaf.grad = torch.where(rows.view(-1, 1, 1, 1), grad, torch.zeros_like(grad))
        opt.step()
    closed = images.clone()
    new_buf = sequential_class_update(closed, buf, grad, row_class, C, lr, m)
    torch.testing.assert_close(closed, leaf.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(new_buf, opt.state[leaf]["momentum_buffer"], rtol=1e-13, atol=1e-13)


def test_pixel_space_step_and_clamp(three):
    """A gm image step moves pixels by exactly lr·∂L/∂pixel (momentum buffer empty), and the clamp puts every
    pixel back into [0, 1]."""
    engine = Distiller(build_config(overrides=[*FAST, "device=cpu"]), three)
    engine.synthetic.images = engine.synthetic.images.detach().double().requires_grad_(True)
    engine.optimizer = torch.optim.SGD([engine.synthetic.images], lr=engine.lr, momentum=engine.config.momentum)
    std = torch.tensor(three.std, dtype=torch.float64).view(1, -1, 1, 1)
    mean = torch.tensor(three.mean, dtype=torch.float64).view(1, -1, 1, 1)
    before = engine.synthetic.images.detach() * std + mean
    pixel_grad = torch.randn_like(before)
    engine.image_step(grad=pixel_grad * std)  # ∂L/∂z = ∂L/∂pixel · std
    after = engine.synthetic.images.detach() * std + mean
    torch.testing.assert_close(before - after, engine.lr * pixel_grad, rtol=1e-10, atol=1e-13)
    assert engine.lr == pytest.approx(5e-3 * 2 / 10)
    with torch.no_grad():
        engine.synthetic.images.mul_(4.0)
    expected = (engine.synthetic.images.detach() * std + mean).clamp(0, 1)
    assert (expected == 0).any() and (expected == 1).any()
    engine.clamp_to_pixel_range()
    torch.testing.assert_close(engine.synthetic.images.detach() * std + mean, expected, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gm_equals_idc_condense_loop_on_cuda(three, monkeypatch):
    events = []
    engine, cutmix_spy = _recorded_engine(three, ["device=cuda", "mix_p=1.0"], torch.float32, events)
    monkeypatch.setattr(gm_module, "draw_cutmix", cutmix_spy)
    engine.method.prepare(engine)
    mean = torch.tensor(three.mean).view(1, -1, 1, 1)
    std = torch.tensor(three.std).view(1, -1, 1, 1)
    start = engine.synthetic.images.detach().cpu() * std + mean
    events.clear()
    losses = [engine.run_iteration(it)["loss"] for it in range(2)]
    a = engine.method.args
    with torch.backends.cudnn.flags(enabled=False):
        ref, ref_losses = condense(start.double(), 3, 2, a.factor, three.mean, three.std, lr_img=1e-3, mom_img=0.5,
                                   metric="mse", iterations=_oracle_iterations(events, three, 3, torch.float64),
                                   n_data=a.n_data, net_args={"lr": a.net_lr, "momentum": a.net_momentum,
                                                              "weight_decay": a.net_weight_decay})
    ref = ref.clamp(0, 1).float()
    ours = engine.synthetic.images.detach().cpu() * std + mean
    moved = float((ref - start).abs().max())
    torch.testing.assert_close(ours - start, ref - start, rtol=0, atol=2e-3 * moved + 1e-6)
    assert losses == pytest.approx(ref_losses, rel=2e-3)


def test_gm_matches_under_the_engines_autocast(three):
    """gm's forwards run under engine._autocast (CPU bf16 stands in for CUDA's here): the update changes,
    stays aligned with fp32's, and the images stay fp32."""
    updates, losses = [], []
    for bf16 in (False, True):
        engine = Distiller(build_config(overrides=[*FAST, "device=cpu", "inner_loop=1"]), three)
        if bf16:
            engine._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        engine.method.prepare(engine)
        before = engine.synthetic.images.detach().clone()
        losses.append(float(engine.run_iteration(0)["loss"]))
        updates.append((engine.synthetic.images.detach() - before).flatten())
        assert engine.synthetic.images.dtype == torch.float32
    cosine = float(updates[0] @ updates[1] / (updates[0].norm() * updates[1].norm()))
    assert 0.95 < cosine < 1 - 1e-6 and losses[0] != losses[1]
    assert losses[1] == pytest.approx(losses[0], rel=0.06)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gm_bf16_autocast_matches_fp32_on_cuda(three):
    """gm honours autocast_bf16: one matching step's image update points where fp32's does and the loss
    agrees to bf16 precision (a gradient difference loses digits: ~2-3 % measured with CPU bf16 autocast)."""
    updates, losses = [], []
    for flag in ("false", "true"):
        engine = Distiller(build_config(overrides=[*FAST, "device=cuda", f"autocast_bf16={flag}", "inner_loop=1"]),
                           three)
        engine.method.prepare(engine)
        before = engine.synthetic.images.detach().clone()
        losses.append(float(engine.run_iteration(0)["loss"]))
        updates.append((engine.synthetic.images.detach() - before).flatten())
    cosine = float(updates[0] @ updates[1] / (updates[0].norm() * updates[1].norm()))
    assert cosine > 0.95
    assert losses[1] == pytest.approx(losses[0], rel=0.06)
