"""SGS in class chunks equals SGS in one pass: update, loss, logs (domain losses, diversity, agreement, shared-norm
ratio), the agreement trace and the images after 2 steps, for every backward, mask and sampling."""
import pytest
import torch

from fastdd.data import from_tensors
from fastdd.data.domains import rotated_mnist
from fastdd.distill import Distiller, build_config
from fastdd.distill.memory import GRAD_ROW_OVERHEAD, ChunkPlan, plan_chunks
from fastdd.distill.methods.sgs_data import domain_generalization_data
from test_chunked_dm import patch_engine

FAST = ["progress=false", "device=cpu", "model=ConvNetW32", "dsa_strategy=color_crop_cutout_flip_scale_rotate",
        "ipc=3", "batch_real=15", "method=sgs"]
UNEVEN = [[0, 1, 2], [3], [4, 5]]
VARIANTS = {"default": [], "plain": ["lambda_sh=0", "lambda_div=0"], "soft-mask": ["lambda_div=0", "gamma=2.0"],
            "func": ["backward=func", "lambda_div=30"], "loop": ["backward=loop"], "pooled": ["sampling=pooled"]}


def _domains(classes: int, size: int, per_class: int = 80):
    g = torch.Generator().manual_seed(0)
    n = classes * per_class
    digits = from_tensors(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
                          torch.arange(n) % classes, num_classes=classes, mean=(0.5,), std=(0.3,))
    return domain_generalization_data(rotated_mnist(digits, angles=(0, 30, 60, 90)), 90)


def _engine(data, *overrides, plan=None, dtype=torch.float32):
    engine = patch_engine(Distiller(build_config(overrides=[*FAST, *overrides]), data[0], data[1],
                                    evaluators=data[2]), plan, dtype)
    engine.method.prepare(engine)
    return engine


def _run(engine, iterations: int = 2):
    """(the step's output, the logs of `iterations` more, images after them, the method's trace as floats)."""
    out = engine.method.compute(engine, 0)
    engine.generator.manual_seed(engine.config.seed + 1)
    logs = [engine.run_iteration(it) for it in range(iterations)]
    return out, logs, engine.synthetic.images.detach().clone(), engine.method.read_trace()


@pytest.fixture(scope="module")
def six_classes():
    return _domains(6, 12)


def _assert_same(chunked, whole, rtol, atol):
    (out_c, logs_c, images_c, trace_c), (out_w, logs_w, images_w, trace_w) = chunked, whole
    value_c = out_c.value if out_c.value is not None else out_c.loss
    value_w = out_w.value if out_w.value is not None else out_w.loss
    torch.testing.assert_close(value_c, value_w, rtol=rtol, atol=0)
    scale = out_w.grad.abs().max()
    torch.testing.assert_close(out_c.grad / scale, out_w.grad / scale, rtol=0, atol=atol)
    for c, w in zip(logs_c, logs_w):
        assert set(c) == set(w)
        for key in w:
            torch.testing.assert_close(torch.as_tensor(c[key]), torch.as_tensor(w[key]), rtol=rtol, atol=atol)
    torch.testing.assert_close(images_c, images_w, rtol=rtol, atol=atol)
    assert len(trace_c) == len(trace_w)
    for c, w in zip(trace_c, trace_w):
        assert set(c) == set(w) and all(c[k] == pytest.approx(w[k], rel=rtol, abs=atol) for k in w)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forced_uneven_chunks_equal_one_pass_in_float64(six_classes, variant):
    whole = _engine(six_classes, *VARIANTS[variant], plan=ChunkPlan([list(range(6))], 1000), dtype=torch.float64)
    chunked = _engine(six_classes, *VARIANTS[variant], plan=ChunkPlan(UNEVEN, 4), dtype=torch.float64)
    syn_rows = []
    make = chunked.new_network

    def network(*a, **k):
        net = make(*a, **k)
        net.features[0].register_forward_pre_hook(
            lambda module, args: syn_rows.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
        return net
    chunked.new_network = network
    result = _run(chunked)
    assert syn_rows[:3] == [9, 3, 6]  # the forced plan ran: 3, 1 and 2 classes of 3 rows
    _assert_same(result, _run(whole), rtol=1e-10, atol=1e-12)
    if variant != "plain":
        assert 0 < result[1][0]["agreement"] < 1  # the surgery's log is a real mean, not a sum over chunks


def _record_plans(engine):
    """The chunk plans engine.chunk_plan hands out (what the step really runs)."""
    plans, plan = [], engine.chunk_plan
    engine.chunk_plan = lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1]
    return plans


def test_real_small_budget_chunks_equal_one_pass():
    # ConvNetW32 at 64 px: 64MiB holds about 18 rows with the 5 cotangents a batched backward pulls back,
    # one class of 10 a chunk
    data = _domains(6, 64, per_class=60)
    whole = _engine(data, "ipc=10", "backward=vmap")
    chunked = _engine(data, "ipc=10", "backward=vmap", "memory_budget=64MiB")
    plans_whole, plans_chunked = _record_plans(whole), _record_plans(chunked)
    result_whole, result_chunked = _run(whole, iterations=1), _run(chunked, iterations=1)
    assert len(plans_chunked) == len(plans_whole) == 2  # one plan a step
    assert all(p.num_chunks == 1 for p in plans_whole) and all(p.num_chunks >= 3 for p in plans_chunked)
    _assert_same(result_chunked, result_whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args,cotangents", [(["backward=vmap"], 5), (["backward=loop"], 1), ([], 1),
                                             (["backward=vmap", "lambda_div=0"], 4),
                                             (["backward=vmap", "lambda_sh=0", "lambda_div=0"], 1)])
def test_the_plan_counts_a_batched_backwards_cotangents(six_classes, args, cotangents):
    """vmap/func pull back 1 (DM) + 1 (diversity) + D = 3 (domains) cotangents at once; loop (auto on the CPU)
    and plain one."""
    engine = _engine(six_classes, *args, "memory_budget=64MiB")
    plans, plan = [], engine.chunk_plan
    engine.chunk_plan = lambda *a, **k: plans.append(k.get("cotangents", 1)) or plan(*a, **k)
    engine.method.compute(engine, 0)
    assert plans == [cotangents]
    net = engine.new_network()
    one, real = int(GRAD_ROW_OVERHEAD * engine.row_bytes(net, True)), engine.row_bytes(net, False)
    engine.memory_budget = 18 * one + 5 * real  # the 18 synthetic rows fit exactly with one cotangent
    assert plan(net, [3] * 6, [5] * 6).num_chunks == 1
    many = plan(net, [3] * 6, [5] * 6, cotangents=cotangents)
    assert many == plan_chunks(engine.memory_budget, [3] * 6, one + (cotangents - 1) * real, [5] * 6, real)
    assert (many.num_chunks > 1) == (cotangents > 1)  # the extra cotangents no longer fit in one chunk
