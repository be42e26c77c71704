"""SGS: batched per-domain gradients vs D backward passes, λ=0 is exactly DM, the update, end to end, bad input."""
import json

import pytest
import torch

from fastdd.cli import main as cli_main
from fastdd.data import from_tensors, load_dataset
from fastdd.data.domains import rotated_mnist
from fastdd.distill import Distiller, build_config
from fastdd.ops import mean_match
from fastdd.distill.methods.dm import dm_loss
from fastdd.distill.methods.sgs import SGS, diversity_loss, domain_cotangents
from fastdd.distill.methods.sgs_data import domain_generalization_data
from fastdd.ops.norm_act_pool import FusedNormActPool
from fastdd.reference.spectral_surgery import spectral_surgery as reference_surgery

FAST = ["progress=false", "device=cpu", "model=ConvNetW32", "eval_models=ConvNetW32", "eval_epochs=2",
        "eval_num_models=1", "ipc=3", "batch_real=15"]


@pytest.fixture(scope="module")
def domains():
    g = torch.Generator().manual_seed(0)
    digits = from_tensors(torch.randint(0, 256, (360, 1, 12, 12), dtype=torch.uint8, generator=g),
                          torch.arange(360) % 3, num_classes=3, mean=(0.5,), std=(0.3,))
    return domain_generalization_data(rotated_mnist(digits, angles=(0, 30, 60, 90)), 90)


def _engine(data, *overrides, method="sgs"):
    cfg = build_config(overrides=[*FAST, f"method={method}", *overrides])
    engine = Distiller(cfg, data[0], data[1], evaluators=data[2])
    engine.method.prepare(engine)
    return engine


def _oracle_domain_grads(engine, batch, real_dom, D):
    """D separate backward passes: per domain, DM's mean_match on that domain's real rows only."""
    grads = []
    for d in range(D):
        rows = real_dom == d
        loss = mean_match(batch.real_features[rows], batch.real_seg[rows], batch.syn_features, batch.syn_seg,
                          engine.num_classes).sum()
        grads.append(torch.autograd.grad(loss, engine.syn.images, retain_graph=True)[0])
    return torch.stack(grads)


@pytest.mark.parametrize("sampling", ["balanced", "pooled"])
def test_batched_domain_gradients_equal_d_backward_passes(domains, sampling):
    engine = _engine(domains, f"sampling={sampling}", "backward=vmap")
    m = engine.method
    batch, backward = m._forward(engine, batched=True)
    real_dom = m.domain_of(engine, batch.real_index)
    per_cd, cot = domain_cotangents(batch.real_features, batch.real_seg, real_dom, batch.syn_features,
                                    batch.syn_seg, 3, m.D)
    oracle = _oracle_domain_grads(engine, batch, real_dom, m.D)
    assert m.D == 3 and cot.shape == (3, 9, batch.syn_features.shape[1])
    for d in range(3):  # the per-(class, domain) losses of the one mean_match call
        rows = real_dom == d
        per_c = mean_match(batch.real_features[rows], batch.real_seg[rows], batch.syn_features.detach(),
                           batch.syn_seg, 3)
        torch.testing.assert_close(per_cd[:, d], per_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(backward(cot), oracle, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["func", "loop"])
def test_func_and_loop_backwards_equal_the_vmap_one(domains, mode):
    out = {}
    for backward in ("vmap", mode):
        engine = _engine(domains, f"backward={backward}", "lambda_div=50", "seed=4")
        out[backward] = engine.method.compute(engine, 0)
    torch.testing.assert_close(out[mode].grad, out["vmap"].grad, rtol=1e-4, atol=1e-7)
    assert float(out[mode].logs["agreement"]) == pytest.approx(float(out["vmap"].logs["agreement"]), rel=1e-4)


def test_batched_backward_through_a_custom_op_network(domains):
    """fastdd::norm_act_pool has no batching rule: is_grads_batched's fallback must still be exact."""
    engine = _engine(domains, "backward=vmap")
    make, calls = engine.new_network, []

    def fused_network(*a, **k):
        net = make(*a, **k)
        for block in net.features:
            fused = FusedNormActPool.from_group_norm(block.norm)
            block.__dict__["tail"] = lambda x, fused=fused: calls.append(1) or fused(x)  # shadows ConvBlock.tail
        return net
    engine.new_network = fused_network
    m = engine.method
    batch, backward = m._forward(engine, batched=True)
    assert len(calls) >= 3  # the network really runs the custom op
    real_dom = m.domain_of(engine, batch.real_index)
    _, cot = domain_cotangents(batch.real_features, batch.real_seg, real_dom, batch.syn_features, batch.syn_seg,
                               3, m.D)
    oracle = _oracle_domain_grads(engine, batch, real_dom, m.D)
    torch.testing.assert_close(backward(cot), oracle, rtol=1e-4, atol=1e-7)


def test_update_is_g_dm_plus_shared_plus_diversity(domains):
    engine = _engine(domains, "lambda_sh=0.7", "lambda_div=30", "tau=0.6", "seed=2")
    m = engine.method
    state = engine.generator.get_state()
    out = m.compute(engine, 0)
    engine.generator.set_state(state)  # replay the same network, rows and draw with plain autograd
    batch, _ = m._forward(engine, batched=False)
    real_dom = m.domain_of(engine, batch.real_index)
    images = engine.syn.images
    g_dm = torch.autograd.grad(dm_loss(batch, 3), images, retain_graph=True)[0]
    g_div = torch.autograd.grad(diversity_loss(batch.syn_features, batch.syn_seg, 3), images, retain_graph=True)[0]
    g_dom = _oracle_domain_grads(engine, batch, real_dom, 3)
    shared, _ = reference_surgery(g_dom, 0.6)
    torch.testing.assert_close(out.grad, g_dm + 0.7 * shared + 30 * g_div, rtol=1e-4, atol=1e-6)
    # balanced sampling: the pooled DM gradient is the mean of the per-domain gradients
    torch.testing.assert_close(g_dom.mean(0), g_dm, rtol=1e-4, atol=1e-7)


def test_lambda_zero_is_exactly_dm(domains):
    runs = {}
    for method, extra in (("dm", []), ("sgs", ["lambda_sh=0", "lambda_div=0", "sampling=pooled"])):
        cfg = build_config(overrides=[*FAST, f"method={method}", "iterations=3", "seed=7", *extra])
        engine = Distiller(cfg, domains[0], domains[1])
        engine.method.prepare(engine)
        for it in range(3):
            engine.method.iteration(engine, it)
        runs[method] = engine.syn.images.detach().clone()
    assert torch.equal(runs["sgs"], runs["dm"])


def test_diversity_loss_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [-1.0, 0.0], [5.0, 5.0]])
    seg = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has one image: no pair
    c = 2 ** -0.5
    class0 = (0.0 + c + c) / 3  # pairs (0,1), (0,2), (1,2)
    class1 = -1.0
    assert float(diversity_loss(f, seg, 3)) == pytest.approx((class0 + class1) / 2, abs=1e-6)


def test_end_to_end_cli_writes_ood_and_id_metrics(mnist_t10k_dir, tmp_path):
    out = tmp_path / "run"
    code = cli_main(["distill", "--method", "sgs", "--dataset", "rotated-mnist", "--data-dir", str(mnist_t10k_dir),
                     "--out", str(out), "--iterations", "2", "holdout_domain=75", "lambda_div=10", *FAST])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["evaluations"][-1]["ConvNetW32"]
    table = metrics["domain_generalization"]["ConvNetW32"]
    assert table["ood"]["mean"] == summary["ood_accuracy_mean"] == table["per_domain"]["75"]
    # ID accuracy is over all source-domain test rows: the row-weighted mean of the per-domain accuracies
    test = domain_generalization_data(rotated_mnist(load_dataset("mnist", split="test", root=str(mnist_t10k_dir))),
                                      "75")[1]
    rows = torch.bincount(test.domains, minlength=6)[:5].double()
    per_domain = torch.tensor([table["per_domain"][d] for d in ("0", "15", "30", "45", "60")], dtype=torch.float64)
    assert table["id"]["mean"] == pytest.approx(float((rows * per_domain).sum() / rows.sum()), abs=1e-6)
    assert metrics["sgs"]["source_domains"] == ["0", "15", "30", "45", "60"]
    assert metrics["sgs"]["holdout_domain"] == "75"


def test_bad_input_errors(domains):
    train, test, _ = domains
    with pytest.raises(ValueError, match=r"holdout_domain 45 is not a domain .* valid domains: 0, 30, 60, 90"):
        _engine(domains, "holdout_domain=45")
    with pytest.raises(ValueError, match="train set holds .* held-out domain 60"):
        _engine(domains, "holdout_domain=60")
    one = (train.subset(train.domains == 0), test, [])
    with pytest.raises(ValueError, match=r"at least 2 source domains, got 1 \['0'\]"):
        _engine(one)
    gap = (train.subset(~((train.domains == 1) & (train.labels == 2))), test, [])
    with pytest.raises(ValueError, match="class '2' has no samples in domain '30'"):
        _engine(gap)
    with pytest.raises(ValueError, match="has no domain labels"):
        _engine((from_tensors(train.images, train.labels, num_classes=3), test, []))
    for bad, message in (("sampling=some", "sampling must be one of balanced, pooled"),
                         ("backward=jit", "backward must be one of auto, vmap, func, loop"),
                         ("lambda_sh=-1", "lambda_sh must be a number >= 0"),
                         ("tau=2", "tau must be a number in"), ("base=nope", "unknown method 'nope'"),
                         ("bogus=1", r"unknown config key\(s\) \['bogus'\] for method 'sgs'")):
        with pytest.raises(ValueError, match=message):
            SGS(build_config(overrides=[bad]).method_args)
    with pytest.raises(ValueError, match="exposes no loss_from_batch"):
        SGS({"base": "gm"})


def test_auto_backward_is_the_loop_on_the_cpu_and_vmap_on_cuda(domains):
    import torch
    engine = _engine(domains)
    assert engine.method.args.backward == "auto"
    pulled = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kw):
        pulled.append(bool(kw.get("is_grads_batched")))
        return real_grad(outputs, inputs, grad_outputs, **kw)
    torch.autograd.grad = spy
    try:
        engine.method.compute(engine, 0)
    finally:
        torch.autograd.grad = real_grad
    assert pulled and not any(pulled)  # one pass per cotangent, never a batched one
