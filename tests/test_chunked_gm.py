"""gm in class chunks (forced uneven plans and a real memory budget) equals gm in one pass; rows per forward stay
within the plan's budget as the number of classes grows."""
import functools

import pytest
import torch

from fastdd.data import from_tensors, load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.memory import ChunkPlan
from fastdd.distill.methods.class_grads import ClassGradients, real_pass, syn_pass
from fastdd.distill.methods.gm import SYN_GRAPH_FACTOR
from test_gm import _float64

FAST = ["progress=false", "device=cpu", "method=gm", "model=ConvNetW32", "batch_real=8", "ipc=2", "inner_loop=2",
        "n_data=16", "net_batch=8", "batch_syn_max=6", "class_chunk=100"]
UNEVEN = [[0, 1, 2], [3], [4, 5, 6, 7, 8], [9]]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def float64(engine):
    """Run an engine in float64: images, optimiser, networks and real images (test_gm's helper)."""
    return _float64(engine)


def engine_for(train, *extra, chunks=None):
    """A float64 engine; `chunks` forces engine.chunk_plan's class chunks."""
    engine = float64(Distiller(build_config(overrides=[*FAST, *extra]), train))
    if chunks is not None:
        engine.chunk_plan = lambda *a, **k: ChunkPlan([list(c) for c in chunks], 1)
    return engine


def record_chunks(engine, method=None):
    """Wrap the method's syn_batch to log the class chunk of every synthetic pass."""
    method = method or engine.method
    method = getattr(method, "base", method) if not hasattr(method, "syn_batch") else method
    seen, syn_batch = [], method.syn_batch
    method.syn_batch = lambda e, x, seg, chunk, *a: seen.append(list(chunk)) or syn_batch(e, x, seg, chunk, *a)
    return seen


def uneven_pool(train) -> torch.Tensor:
    """Training indices with only 3 images of class 2 and 5 of class 8: classes get unequal real rows."""
    labels = torch.as_tensor(train.labels)
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c, n in ((2, 3), (8, 5)):
        keep[(labels == c).nonzero().flatten()[n:]] = False
    return keep.nonzero().flatten()


def one_step(engine, pool=None):
    engine.set_active(None, pool=pool)
    engine.method.prepare(engine)
    state = engine.method.begin_iteration(engine, 0)
    return engine.method.compute_inner(engine, 0, state, 0)


@pytest.mark.parametrize("extra", [[], ["aug=dsa", "step_per_class=false", "distance=cos", "factor=1"]])
def test_forced_uneven_chunks_equal_one_pass(digits, extra):
    torch.set_num_threads(1)
    one, chunked = engine_for(digits, *extra, chunks=[list(range(10))]), engine_for(digits, *extra, chunks=UNEVEN)
    seen_one, seen = record_chunks(one), record_chunks(chunked)
    outs = [one_step(e, uneven_pool(digits)) for e in (one, chunked)]
    assert seen_one == [list(range(10))] and seen == UNEVEN
    assert outs[0].grad.abs().sum() > 0
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(float(outs[1].value), float(outs[0].value), rtol=1e-12, atol=0)
    assert torch.is_tensor(outs[1].value)  # the step value stays on the device (no host read)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_forced_uneven_chunks_equal_one_pass_on_cuda(digits):
    one, chunked = (engine_for(digits, "device=cuda", chunks=c) for c in ([list(range(10))], UNEVEN))
    seen = record_chunks(chunked)
    outs = [one_step(e, uneven_pool(digits)) for e in (one, chunked)]
    assert seen == UNEVEN and outs[0].grad.is_cuda
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-7, atol=1e-10)  # float64 on the device
    torch.testing.assert_close(float(outs[1].value), float(outs[0].value), rtol=1e-9, atol=0)


def test_forced_chunks_equal_one_pass_over_an_outer_iteration(digits):
    # an outer iteration: sequential class steps, network training between them, IDC aug and CutMix draws
    torch.set_num_threads(1)
    one, chunked = engine_for(digits, chunks=[list(range(10))]), engine_for(digits, chunks=UNEVEN)
    init = engine_for(digits)
    for engine in (one, chunked, init):
        engine.method.prepare(engine)
    seen = record_chunks(chunked)
    for engine in (one, chunked):
        engine.run_iteration(0)
    assert seen == UNEVEN * 2
    assert (one.synthetic.images - init.synthetic.images).abs().max() > 1e-3
    torch.testing.assert_close(chunked.synthetic.images, one.synthetic.images, rtol=1e-9, atol=1e-12)
    assert torch.equal(chunked.generator.get_state(), one.generator.get_state())


def test_small_memory_budget_chunks_and_equals_one_pass(digits):
    torch.set_num_threads(1)
    extra = ["ipc=40", "batch_syn_max=0", "batch_real=80", "inner_loop=1"]  # 3 classes per 64MiB chunk
    one = engine_for(digits, *extra, "memory_budget=100GB")
    small = engine_for(digits, *extra, "memory_budget=64MiB")
    seen_one, seen = record_chunks(one), record_chunks(small)
    outs = [one_step(e) for e in (one, small)]
    assert seen_one == [list(range(10))]
    assert len(seen) >= 3 and sum(seen, []) == list(range(10))
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(float(outs[1].value), float(outs[0].value), rtol=1e-12, atol=0)


def tiny_classes(num_classes: int, per_class: int = 64, size: int = 8):
    g = torch.Generator().manual_seed(num_classes)
    images = torch.randint(0, 256, (num_classes * per_class, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return from_tensors(images, labels, name=f"tiny{num_classes}", num_classes=num_classes)


# syn- / real-heavy, at sizes where 96MiB holds 4 to 15 classes of gm's (unfused) ConvNet
@pytest.mark.parametrize("rows,size", [(["ipc=16", "batch_real=32"], 12), (["ipc=1", "batch_real=64"], 20)])
def test_rows_per_pass_stay_within_the_budget_as_classes_grow(monkeypatch, rows, size):
    torch.set_num_threads(1)
    budget = 96 * 2**20
    passes, call = [], ClassGradients.__call__

    def logged(self, x, y, counts, create_graph):
        passes[-1].append((x.shape[0], create_graph))
        return call(self, x, y, counts, create_graph)
    monkeypatch.setattr(ClassGradients, "__call__", logged)
    largest, chunks = [], []
    for classes in (4, 16, 32):
        engine = Distiller(build_config(overrides=[*FAST, *rows, "batch_syn_max=0", "memory_budget=96MiB"]),
                           tiny_classes(classes, size=size))
        passes.append([])
        seen = record_chunks(engine)
        state = engine.method.begin_iteration(engine, 0)
        engine.method.compute_inner(engine, 0, state, 0)
        syn_bytes = engine.row_bytes(state.net, True, functools.partial(syn_pass, distance="idc"), ("gm-syn", "idc"))
        real_bytes = engine.row_bytes(state.net, True, real_pass, "gm-real")
        pairs = list(zip(passes[-1][0::2], passes[-1][1::2]))  # (real pass, synthetic pass) per chunk
        assert [(r[1], s[1]) for r, s in pairs] == [(False, True)] * len(seen)
        for (real_rows, _), (syn_rows, _) in pairs:
            assert SYN_GRAPH_FACTOR * syn_rows * syn_bytes + real_rows * real_bytes <= budget
        largest.append(max(s + r for (r, _), (s, _) in pairs))
        chunks.append(len(seen))
    assert largest[2] <= largest[1]  # flat: more classes make more chunks, not larger passes
    assert chunks[0] == 1 and chunks[2] > chunks[1] > 1


def test_per_class_weight_gradients_count_in_the_plan():
    # ConvNet (width 128) with 1 synthetic and 4 real rows per class: the per-class real and synthetic weight
    # gradients (2 × 1.2 MB) are a quarter of a class's memory, enough to break the budget if left out
    torch.set_num_threads(1)
    budget = 64 * 2**20
    engine = Distiller(build_config(overrides=[*FAST, "model=ConvNet", "ipc=1", "factor=1", "batch_real=4",
                                               "memory_budget=64MiB"]), tiny_classes(48, per_class=8))
    seen = record_chunks(engine)
    state = engine.method.begin_iteration(engine, 0)
    engine.method.compute_inner(engine, 0, state, 0)
    weight_bytes = sum(p.numel() * p.element_size() for p in state.grads.params)
    syn_bytes = engine.row_bytes(state.net, True, functools.partial(syn_pass, distance="idc"), ("gm-syn", "idc"))
    real_bytes = engine.row_bytes(state.net, True, real_pass, "gm-real")
    assert len(seen) >= 2 and sum(seen, []) == list(range(48))
    for chunk in seen:
        assert len(chunk) * (2 * weight_bytes + SYN_GRAPH_FACTOR * syn_bytes + 4 * real_bytes) <= budget


def test_network_training_reads_only_its_batches(digits):
    # n_data=20 with batches of 8: three reads of 8 rows (IDC stops an epoch once n_data samples were seen)
    torch.set_num_threads(1)
    engine = engine_for(digits, "n_data=20", "net_batch=8", "net_epoch=2")
    reads, real_images = [], engine.real_images
    engine.real_images = lambda index: reads.append(len(index)) or real_images(index)
    state = engine.method.begin_iteration(engine, 0)
    engine.method.train_network(engine, state.net, state.optimizer)
    assert reads == [8, 8, 8] * 2
