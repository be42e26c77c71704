"""Robust DD: β = 0 is DM, objective vs a per-class loop with brute-force CVaR, gradient to the worst clusters,
empty clusters, end to end (API and CLI) with worst-cluster / worst-group metrics, resume, bad input."""
import io
import json

import pytest
import torch

from fastdd.cli import main as cli_main
from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.methods.dm import DM
from fastdd.distill.methods.robust import Robust, present_cvar
from fastdd.data.mnist_pool import mnist_pool
from fastdd.distill.methods.robust_data import cluster_test_set, subpop_data, worst_cluster_metric, worst_group_metric

FAST = ["progress=false", "device=cpu", "eval_epochs=2", "eval_num_models=1", "batch_real=12", "ipc=2",
        "model=ConvNetW32", "eval_models=ConvNetW32"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", split="test")


def _engine(data, *overrides, method="robust", out=None):
    cfg = build_config(overrides=[*FAST, f"method={method}", *overrides])
    return Distiller(cfg, data[0], data[1], out_dir=out)


def _loss(out):
    """The step's loss: a loss to backpropagate, or (methods that hand the engine a gradient) its value."""
    return (out.loss if out.loss is not None else out.value).detach()


def _grad(engine, out):
    """The image gradient of a step: backpropagated from its loss, or the gradient it hands the engine."""
    if out.loss is not None and out.loss.requires_grad:
        return torch.autograd.grad(out.loss, engine.syn.images)[0]
    return out.grad


# ---- β = 0 is DM ------------------------------------------------------------------------------
@pytest.mark.parametrize("assignment", ["kmeans", "nearest-synthetic"])
def test_beta_zero_is_exactly_dm(digits, assignment):
    dm, rob = _engine(digits, method="dm"), _engine(digits, "beta=0", f"assignment={assignment}")
    rob.method.prepare(rob)
    out_dm, out_rob = DM().compute(dm, 0), rob.method.compute(rob, 0)
    assert torch.equal(_loss(out_dm), _loss(out_rob))
    assert torch.equal(_grad(dm, out_dm), _grad(rob, out_rob))
    if assignment == "nearest-synthetic":  # the cluster path ran (logged) without entering the objective
        assert out_rob.logs["cvar"] > 0
    for engine in (dm, rob):  # and whole runs stay identical, draw for draw
        engine.config.iterations = 3
        engine.test = None
        engine.run()
    assert torch.equal(dm.syn.images, rob.syn.images)
    assert rob.method.cluster_ids is None and rob.method.reclusters == 0


# ---- the objective vs a per-class loop with brute-force Rockafellar–Uryasev CVaR -------------------
def _ru_cvar(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """min over t in the values of t + Σ(L − t)+ / (α K): the RU form, differentiated by autograd."""
    K = values.shape[0]
    return torch.stack([t + (values - t).clamp_min(0).sum() / (alpha * K) for t in values]).min()


def _oracle(engine, net, index, seg, cluster, K, alpha, beta):
    real = net.embed(engine.real_images(index)).double()
    syn = net.embed(engine.syn.images).double()
    total = syn.new_zeros(())
    for c in range(engine.num_classes):
        mu_s = syn[engine.syn.seg == c].mean(0)
        rows = seg == c
        l_c = (real[rows].mean(0) - mu_s).square().sum()
        l_ck = [(real[rows & (cluster == k)].mean(0) - mu_s).square().sum() for k in range(K)
                if bool((rows & (cluster == k)).any())]  # empty (class, cluster) cells are excluded
        total = total + (1 - beta) * l_c + beta * _ru_cvar(torch.stack(l_ck), alpha)
    return total


@pytest.mark.parametrize("assignment,alpha,beta", [("kmeans", 0.5, 0.5), ("kmeans", 0.3, 1.0),
                                                   ("nearest-synthetic", 0.6, 0.7)])
def test_objective_and_gradient_match_per_class_loop(digits, assignment, alpha, beta):
    engine = _engine(digits, f"assignment={assignment}", f"alpha={alpha}", f"beta={beta}", "k=3",
                     "dsa_strategy=none", "ipc=3")
    m = engine.method
    m.prepare(engine)
    net = engine.new_network()
    index, seg = engine.sample_real_index(12)
    engine.new_network = lambda *a, **k: net
    engine.sample_real_index = lambda *a, **k: (index, seg)
    g = torch.Generator().manual_seed(1)
    m.cluster_ids = torch.randint(0, 3, (len(engine.train),), generator=g)
    m.cluster_ids[index[seg == 4]] = 1  # class 4: clusters 0 and 2 empty in this batch
    m.clustered_at = 0
    out = m.compute(engine, 1)
    K = 3
    if assignment == "kmeans":
        cluster = m.cluster_ids[index]
    else:  # nearest synthetic image of the row's class, brute force
        with torch.no_grad():
            r, s = net.embed(engine.real_images(index)), net.embed(engine.syn.images).view(10, 3, -1)
            cluster = torch.stack([(s[c] - x).square().sum(1).argmin() for x, c in zip(r, seg)])
    ref = _oracle(engine, net, index, seg, cluster, K, alpha, beta)
    torch.testing.assert_close(_loss(out).double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grad(engine, out), torch.autograd.grad(ref, engine.syn.images)[0].float(),
                               rtol=1e-3, atol=1e-7)
    empty = sum(not bool(((seg == c) & (cluster == k)).any()) for c in range(10) for k in range(K))
    assert out.logs["empty_cells"] == empty and (empty >= 2 or assignment != "kmeans")


# ---- CVaR over present clusters: hand-computed values and where the gradient goes ---------------
def test_present_cvar_weights_the_worst_present_clusters():
    losses = torch.tensor([[1.0, 5.0, 3.0, 2.0], [1.0, 9.0, 3.0, 2.0], [4.0, 4.0, 4.0, 4.0]], requires_grad=True)
    present = torch.tensor([[True] * 4, [True, False, True, True], [False] * 4])
    out = present_cvar(losses, present, 0.5)
    # row 0: K=4, worst 2 -> (5+3)/2; row 1: the 9 is absent, K_c=3, αK=1.5 -> (3 + 0.5·2)/1.5; row 2: none -> 0
    torch.testing.assert_close(out, torch.tensor([4.0, 4.0 / 1.5, 0.0]))
    (g,) = torch.autograd.grad(out.sum(), losses)
    torch.testing.assert_close(g, torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 1 / 1.5, 0.5 / 1.5], [0, 0, 0, 0]]))
    out = present_cvar(losses, present, 0.3)  # fractional: (5 + 0.2·3)/1.2 and (3 + ... ) with αK_c = 0.9
    torch.testing.assert_close(out[:2], torch.tensor([5.6 / 1.2, 3.0]))


def test_present_cvar_ignores_non_finite_absent_cells():
    losses = torch.tensor([[float("inf"), 2.0, 6.0], [float("nan"), float("nan"), 1.0]], requires_grad=True)
    present = torch.tensor([[False, True, True], [False, False, True]])
    out = present_cvar(losses, present, 0.5)  # row 0: K_c = 2 -> the 6; row 1: K_c = 1 -> the 1
    torch.testing.assert_close(out, torch.tensor([6.0, 1.0]))
    (g,) = torch.autograd.grad(out.sum(), losses)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))


def test_gradient_reaches_only_the_worst_clusters_images(digits):
    # α·K = 1 and β = 1: the image gradient is exactly the gradient of each class's WORST cluster loss
    engine = _engine(digits, "alpha=0.25", "beta=1", "k=4", "dsa_strategy=none")
    m = engine.method
    net = engine.new_network()
    index, seg = engine.sample_real_index(12)
    engine.new_network = lambda *a, **k: net
    engine.sample_real_index = lambda *a, **k: (index, seg)
    m.cluster_ids, m.clustered_at = torch.arange(len(engine.train)) % 4, 0
    grad = _grad(engine, m.compute(engine, 1))
    real, syn = net.embed(engine.real_images(index)), net.embed(engine.syn.images)
    cluster = m.cluster_ids[index]
    worst, mean = [], []
    for c in range(10):
        mu_s = syn[engine.syn.seg == c].mean(0)
        l_k = torch.stack([(real[(seg == c) & (cluster == k)].mean(0) - mu_s).square().sum() for k in range(4)
                           if bool(((seg == c) & (cluster == k)).any())])
        worst.append(l_k.max())
        mean.append(l_k.mean())
    g_worst = torch.autograd.grad(torch.stack(worst).sum(), engine.syn.images, retain_graph=True)[0]
    g_mean = torch.autograd.grad(torch.stack(mean).sum(), engine.syn.images)[0]
    torch.testing.assert_close(grad, g_worst, rtol=1e-3, atol=1e-7)
    assert (grad - g_mean).abs().max() > 10 * (grad - g_worst).abs().max()


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture
def subpop(mnist_t10k_dir):
    pool = load_dataset("mnist", split="test", root=str(mnist_t10k_dir))
    keep = torch.cat([(pool.labels == c).nonzero().flatten()[:60] for c in range(10)])
    return subpop_data(pool.subset(keep), "rotate", rare_fraction=0.1, test_fraction=0.3)


def _cell_min_mean(correct, cells):
    """Brute force: accuracy of every non-empty cell, then (min, unweighted mean)."""
    accs = [float(correct[cells == v].double().mean()) for v in sorted(set(cells.tolist()))]
    return min(accs), sum(accs) / len(accs)


def test_run_writes_worst_cluster_and_worst_group_metrics(subpop, tmp_path):
    train, test, evaluators = subpop
    recorded = []

    def recording(metric):
        def wrapped(net, test_set, predictions):
            recorded.append(predictions.cpu())
            return metric(net, test_set, predictions)
        wrapped.__dict__.update(metric.__dict__)  # keeps `kind`, so robust adds no second worst-cluster metric
        return wrapped
    cfg = build_config(overrides=[*FAST, "method=robust", "iterations=3", "k=2", "recluster_every=2",
                                  "checkpoint_every=0"])
    engine = Distiller(cfg, train, test, out_dir=str(tmp_path), evaluators=[recording(e) for e in evaluators])
    engine.run()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    s = saved["evaluations"][-1]["ConvNetW32"]
    correct = recorded[-1] == test.labels
    worst, mean = _cell_min_mean(correct, test.labels * 4 + cluster_test_set(test, 4))
    assert s["worst_cluster_accuracy_mean"] == pytest.approx(worst)
    assert s["mean_cluster_accuracy_mean"] == pytest.approx(mean)
    assert s["worst_group_accuracy_mean"] == pytest.approx(_cell_min_mean(correct, test.labels * 2 + test.domains)[0])
    assert s["accuracy_group_rotated_mean"] == pytest.approx(float(correct[test.domains == 1].double().mean()))
    table = saved["subpopulation_accuracy"]["ConvNetW32"]
    assert table["worst_cluster_accuracy_mean"] == s["worst_cluster_accuracy_mean"]
    assert saved["robust"]["reclusters"] == 2  # iterations 0 and 2
    ids = engine.method.cluster_ids
    cells = torch.bincount(train.labels * 2 + ids, minlength=20).view(10, 2)
    assert saved["robust"]["cluster_sizes"] == cells.tolist()


def test_evaluators_hand_computed():
    from fastdd.data import from_tensors
    images = torch.cat([torch.zeros(4, 1, 2, 2), torch.full((4, 1, 2, 2), 200.0)]).to(torch.uint8).repeat(2, 1, 1, 1)
    ds = from_tensors(images, torch.tensor([0] * 8 + [1] * 8), num_classes=2)
    ds.domains, ds.domain_names = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1] * 2), ["common", "rare"]
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1] + [1] * 8)  # class 0: dark images right, bright 1/4
    wc = worst_cluster_metric(k=2)(None, ds, pred)  # pixel clusters = dark / bright within each class
    assert wc == {"worst_cluster_accuracy": 0.25, "mean_cluster_accuracy": (1 + 0.25 + 1 + 1) / 4}
    wg = worst_group_metric(ds.domain_names)(None, ds, pred)
    assert wg == {"worst_group_accuracy": 0.25, "accuracy_group_common": 1.0, "accuracy_group_rare": 5 / 8}


def test_cli_robust_on_subpop_mnist(mnist_t10k_dir, tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["distill", "--method", "robust", "--dataset", "subpop-mnist", "--data-dir", str(mnist_t10k_dir),
                   "--out", str(out), "iterations=1", "ipc=1", "batch_real=4", "k=2", "alpha=0.5", "beta=0.5",
                   "model=ConvNetD1", "eval_models=ConvNetD1", "eval_epochs=1", "eval_num_models=1",
                   "progress=false", "device=cpu", "embedding=pixels", "checkpoint_every=0"])
    assert rc == 0
    saved = json.loads((out / "metrics.json").read_text())
    train = subpop_data(mnist_pool(str(mnist_t10k_dir)), "rotate")[0]  # the subpop-mnist split, built directly
    sizes = torch.tensor(saved["robust"]["cluster_sizes"])
    assert sizes.shape == (10, 2) and torch.equal(sizes.sum(1), torch.bincount(train.labels, minlength=10))
    assert saved["robust"]["reclusters"] == 1 and saved["robust"]["clusters_per_class"] == 2


# ---- resume ----------------------------------------------------------------------------------------
def test_resume_keeps_cluster_ids_and_is_bit_identical(digits):
    over = ["iterations=5", "recluster_every=3", "k=2", "checkpoint_every=0"]
    saved = {}

    def grab(engine, logs):
        if engine.iteration == 2:
            buf = io.BytesIO()
            torch.save(engine.state_dict(), buf)
            saved["state"], saved["ids"] = buf.getvalue(), engine.method.cluster_ids.clone()

    straight = _engine(digits, *over)
    straight.test = None
    straight.run(callback=grab)
    resumed = _engine(digits, *over)
    resumed.test = None
    resumed.load_state_dict(torch.load(io.BytesIO(saved["state"]), weights_only=False))
    assert torch.equal(resumed.method.cluster_ids, saved["ids"]) and resumed.method.clustered_at == 0
    resumed.run()
    assert resumed.method.reclusters == straight.method.reclusters == 2
    assert torch.equal(resumed.method.cluster_ids, straight.method.cluster_ids)
    assert torch.equal(resumed.syn.images, straight.syn.images)


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("k=0", "'k' must be a positive integer"), ("k=true", "'k' must be a positive integer"),
    ("alpha=0", r"'alpha' must be a number in \(0, 1\]"), ("alpha=1.5", r"'alpha' must be a number in \(0, 1\]"),
    ("beta=-0.1", r"'beta' must be a number in \[0, 1\]"), ("beta=2", r"'beta' must be a number in \[0, 1\]"),
    ("assignment=nearest", "'assignment' must be one of kmeans, nearest-synthetic; got 'nearest'"),
    ("embedding=clip", "'embedding' must be one of random-net, pixels"),
    ("base=sgs", "'base' must be one of dm, gm; got 'sgs'"),
    ("base=gm,assignment=nearest-synthetic", "'assignment' must be 'kmeans' when base='gm'"),
    ("base=gm,bogus=1", r"unknown config key\(s\) \['bogus'\] for method 'gm'"),
    ("recluster_every=-1", "'recluster_every' must be a non-negative integer"),
    ("bogus=1", r"unknown config key\(s\) \['bogus'\] for method 'robust'")])
def test_bad_input_names_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        Robust(build_config(overrides=override.split(",")).method_args)


def test_k_larger_than_a_class_is_named(digits):
    engine = _engine(digits, "k=500")
    with pytest.raises(ValueError, match=r"'k' \(500\) exceeds the 1\d\d training images of class"):
        engine.run()
