"""One DM and one SGS iteration make no host sync (CPU proxies here, CUDA sync debug mode on a GPU); lazy loss reads."""
import json

import pytest
import torch

from fastdd.data import from_tensors
from fastdd.data.domains import rotated_mnist
from fastdd.distill import Distiller, build_config
from fastdd.distill.memory import ChunkPlan
from fastdd.distill.methods.sgs import diversity_loss
from fastdd.distill.methods.sgs_data import domain_generalization_data
from fastdd.sync import count_host_syncs

FAST = ["progress=false", "model=ConvNetW32", "eval_models=ConvNetW32", "eval_epochs=1", "eval_num_models=1",
        "ipc=3", "batch_real=15"]
# no DSA on the CPU: its CPU path reads bucket sizes on the host by design (the GPU path is masked)
CPU = ["device=cpu", "dsa_strategy="]
SGS_VARIANTS = [[], ["lambda_sh=0", "lambda_div=0"], ["lambda_div=0", "gamma=2.0"]]


@pytest.fixture(scope="module")
def digits():
    g = torch.Generator().manual_seed(0)
    return from_tensors(torch.randint(0, 256, (360, 1, 12, 12), dtype=torch.uint8, generator=g),
                        torch.arange(360) % 3, num_classes=3, mean=(0.5,), std=(0.3,))


@pytest.fixture(scope="module")
def domains(digits):
    return domain_generalization_data(rotated_mnist(digits, angles=(0, 30, 60, 90)), 90)


def _engine(data, method, *overrides, out_dir=None):
    cfg = build_config(overrides=[*FAST, f"method={method}", *overrides])
    engine = Distiller(cfg, data[0], data[1], out_dir=out_dir, evaluators=data[2])
    engine.method.prepare(engine)
    engine._prepared = True
    return engine


def _syncs_of_one_iteration(engine, **counter_args):
    engine.run_iteration(0)  # first call: lazy caches (kernels, per-device tables)
    with count_host_syncs(**counter_args) as syncs:
        logs = engine.run_iteration(1)
    return syncs, logs


def test_one_dm_iteration_makes_no_host_sync(digits):
    engine = _engine((digits, None, ()), "dm", *CPU)
    before = engine.synthetic.images.detach().clone()
    syncs, logs = _syncs_of_one_iteration(engine)
    syncs.assert_none("one DM iteration")
    assert torch.is_tensor(logs["loss"]) and float(logs["loss"]) > 0
    assert not torch.equal(engine.synthetic.images.detach(), before)  # the step did update the images


@pytest.mark.parametrize("args", SGS_VARIANTS, ids=["default", "plain", "soft-mask"])
def test_one_sgs_iteration_makes_no_host_sync(domains, args):
    engine = _engine(domains, "sgs", *CPU, *args)
    syncs, logs = _syncs_of_one_iteration(engine)
    syncs.assert_none(f"one SGS iteration {args}")
    assert torch.is_tensor(logs["loss"]) and logs["domain_losses"].shape == (3,)
    # balanced batch: μ_real(c) is the mean of the per-domain means, so by convexity (1/D)·Σ_d L_d >= L
    assert float(logs["domain_losses"].mean()) >= float(logs["loss"]) > 0


def _chunked(engine):
    engine.chunk_plan = lambda *a, **k: ChunkPlan([[0], [1], [2]], 4)  # 3 class chunks, real rows in passes of 4
    return engine


def test_a_chunked_dm_iteration_makes_no_host_sync(digits):
    engine = _chunked(_engine((digits, None, ()), "dm", *CPU))
    syncs, logs = _syncs_of_one_iteration(engine)
    syncs.assert_none("one DM iteration in 3 class chunks")
    assert torch.is_tensor(logs["loss"]) and float(logs["loss"]) > 0


@pytest.mark.parametrize("args", SGS_VARIANTS, ids=["default", "plain", "soft-mask"])
def test_a_chunked_sgs_iteration_makes_no_host_sync(domains, args):
    engine = _chunked(_engine(domains, "sgs", *CPU, *args))
    syncs, logs = _syncs_of_one_iteration(engine)
    syncs.assert_none(f"one SGS iteration {args} in 3 class chunks")
    assert float(logs["domain_losses"].mean()) >= float(logs["loss"]) > 0


ROBUST_VARIANTS = [["assignment=kmeans"], ["assignment=nearest-synthetic"], ["alpha=0.3", "beta=1.0"]]


@pytest.mark.parametrize("args", ROBUST_VARIANTS, ids=["kmeans", "nearest-synthetic", "fractional-cvar"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_one_robust_iteration_makes_no_host_sync(digits, args, chunked):
    engine = _engine((digits, None, ()), "robust", *CPU, *args)  # k-means runs in the first (uncounted) call
    if chunked:
        _chunked(engine)
    syncs, logs = _syncs_of_one_iteration(engine)
    syncs.assert_none(f"one robust iteration {args}")
    assert torch.is_tensor(logs["cvar"]) and float(logs["cvar"]) > 0
    assert float(logs["worst_cluster_loss"]) > 0 and float(logs["dm_loss"]) > 0


def test_robust_running_sums_are_read_once_into_floats(digits):
    engine = _engine((digits, None, ()), "robust", *CPU, "assignment=nearest-synthetic")
    logs = [engine.run_iteration(i) for i in range(3)]
    info = engine.method.metrics(engine)["robust"]
    for key in ("dm_loss", "cvar", "worst_cluster_loss", "empty_cells"):
        assert type(info[f"{key}_mean"]) is float
        assert info[f"{key}_mean"] == pytest.approx(sum(float(entry[key]) for entry in logs) / 3, rel=1e-12)
    state = engine.method.state_dict()
    assert all(type(v) is float for v in state["sums"].values()) and state["count"] == 3


def test_losses_are_read_lazily_and_saved_as_floats(digits, tmp_path):
    engine = _engine((digits, digits, ()), "dm", *CPU, "iterations=4", "eval_every=2", "checkpoint_every=3",
                     out_dir=str(tmp_path))
    seen, evaluated = [], []

    class Recorder:
        def __call__(self, engine, logs):
            seen.append(logs["loss"])

        def on_evaluation(self, entry):
            evaluated.append(entry)

    metrics = engine.run(callback=Recorder())
    expected = [float(t) for t in seen]
    assert all(torch.is_tensor(t) for t in seen) and len(expected) == 4
    assert engine.history["loss"] == expected and all(type(v) is float for v in engine.history["loss"])
    assert metrics["final_loss"] == expected[-1]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final_loss"] == expected[-1]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    saved_losses = checkpoint["history"]["loss"]
    assert saved_losses == expected[:3] and all(type(v) is float for v in saved_losses)
    assert [e["iteration"] for e in evaluated] == [2, 4]
    assert evaluated == engine.history["evaluations"]


def test_resumed_run_has_the_same_float_losses_and_images(digits, tmp_path):
    straight = _engine((digits, None, ()), "dm", *CPU, "iterations=4")
    straight.run()
    first = _engine((digits, None, ()), "dm", *CPU, "iterations=2", "checkpoint_every=2", out_dir=str(tmp_path))
    first.run()
    resumed = _engine((digits, None, ()), "dm", *CPU, "iterations=3")
    resumed.run()  # an engine that ran past the checkpoint: its own read position must not survive the load
    resumed.config.iterations = 4
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    resumed.run()
    assert resumed.history["loss"] == straight.history["loss"]
    assert all(type(v) is float for v in resumed.history["loss"]) and len(resumed.history["loss"]) == 4
    assert torch.equal(resumed.synthetic.images, straight.synthetic.images)


def test_sgs_trace_is_read_once_into_floats(domains):
    engine = _engine(domains, "sgs", *CPU)
    logs = [engine.run_iteration(i) for i in range(2)]
    expected = [float(entry["agreement"]) for entry in logs]
    metrics = engine.method.metrics(engine)["sgs"]
    assert type(metrics["agreement_mean"]) is float  # metrics JSON holds numbers, not tensors
    assert metrics["agreement_mean"] == pytest.approx(sum(expected) / 2, rel=1e-12)
    logs.append(engine.run_iteration(2))  # logged after the read above: still a tensor until the next read
    state = engine.method.state_dict()
    assert [t["agreement"] for t in state["trace"]] == expected + [float(logs[2]["agreement"])]
    assert all(type(t["agreement"]) is float and type(t["diversity"]) is float for t in state["trace"])


def test_diversity_loss_without_pairs_is_zero_with_zero_gradient():
    features = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], requires_grad=True)
    loss = diversity_loss(features, torch.tensor([0, 1, 2]), 3)  # one image per class: no pair anywhere
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(features.grad, torch.zeros(3, 2))
    # mixed: the singleton class 1 does not enter the mean; class 0's one pair has cosine 1
    pair_and_singleton = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert float(diversity_loss(pair_and_singleton, torch.tensor([0, 0, 1]), 2)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
def test_one_dm_iteration_makes_no_cuda_sync(digits, chunked):
    engine = _engine((digits, None, ()), "dm", "device=cuda")  # with the default DSA (masked GPU path)
    if chunked:
        _chunked(engine)  # several real passes: pinned staging slots reused, side-stream copies
    syncs, _ = _syncs_of_one_iteration(engine, cuda=True)
    syncs.assert_none("one DM iteration on CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("args", SGS_VARIANTS, ids=["default", "plain", "soft-mask"])
def test_one_sgs_iteration_makes_no_cuda_sync(domains, args):
    engine = _engine(domains, "sgs", "device=cuda", *args)
    syncs, _ = _syncs_of_one_iteration(engine, cuda=True)
    syncs.assert_none(f"one SGS iteration {args} on CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("args", ROBUST_VARIANTS, ids=["kmeans", "nearest-synthetic", "fractional-cvar"])
def test_one_robust_iteration_makes_no_cuda_sync(digits, args):
    engine = _engine((digits, None, ()), "robust", "device=cuda", *args)
    syncs, _ = _syncs_of_one_iteration(engine, cuda=True)
    syncs.assert_none(f"one robust iteration {args} on CUDA")
