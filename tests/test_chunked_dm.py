"""DM in class chunks equals DM in one pass (loss, image gradient, images after 2 steps); rows per forward stay
bounded as classes grow; BatchNorm nets refuse a budget they cannot be chunked under; pinned staging degrades."""
import numpy as np
import pytest
import torch

from fastdd.data import from_tensors
from fastdd.data.staging import RealStager, gather_rows, module_to_device
from fastdd.distill import Distiller, build_config
from fastdd.distill.memory import ChunkPlan
from fastdd.models import get_model
from fastdd.sync import count_host_syncs

FAST = ["device=cpu", "progress=false", "model=ConvNet", "dsa_strategy=color_crop_cutout_flip_scale_rotate"]
UNEVEN = [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9]]


def _images(classes: int, per_class: int, size: int, channels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    return from_tensors(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % classes, num_classes=classes, mean=(0.4,) * channels, std=(0.3,) * channels)


def _engine(data, *overrides, plan=None, dtype=torch.float32):
    return patch_engine(Distiller(build_config(overrides=[*FAST, "method=dm", *overrides]), data), plan, dtype)


def patch_engine(engine, plan=None, dtype=torch.float32):
    """Force `plan` on the engine and run its network, real rows and images in `dtype` (float64 oracles)."""
    if plan is not None:
        engine.chunk_plan = lambda *a, **k: plan
    if dtype != torch.float32:
        make, passes = engine.new_network, engine.real_passes
        engine.new_network = lambda *a, **k: make(*a, **k).to(dtype)
        engine.real_passes = lambda *a, **k: (x.to(dtype) for x in passes(*a, **k))
        engine.embed = lambda net, x: net.embed(x)  # (the engine's embed returns float32 features)
        engine.synthetic.images = engine.synthetic.images.detach().to(dtype).requires_grad_(True)
        engine.optimizer = torch.optim.SGD([engine.synthetic.images], lr=engine.lr, momentum=engine.config.momentum)
    return engine


def _record_batches(engine):
    """Rows of every forward the step's networks take: (with grad: synthetic, without: real)."""
    seen = {"syn": [], "real": []}
    make = engine.new_network

    def network(*a, **k):
        net = make(*a, **k)
        net.features[0].register_forward_pre_hook(
            lambda module, args: seen["syn" if torch.is_grad_enabled() else "real"].append(args[0].shape[0]))
        return net
    engine.new_network = network
    return seen


def _step_and_two_iterations(engine):
    out = engine.method.compute(engine, 0)
    engine.generator.manual_seed(engine.config.seed + 1)
    for it in range(2):
        engine.run_iteration(it)
    return out, engine.synthetic.images.detach().clone()


@pytest.fixture(scope="module")
def ten_classes():
    return _images(10, 12, 16)


def test_forced_uneven_chunks_equal_one_pass_in_float64(ten_classes):
    whole = _engine(ten_classes, "ipc=2", "batch_real=5", plan=ChunkPlan([list(range(10))], 50), dtype=torch.float64)
    chunked = _engine(ten_classes, "ipc=2", "batch_real=5", plan=ChunkPlan(UNEVEN, 3), dtype=torch.float64)
    seen = _record_batches(chunked)
    (one, images_one), (many, images_many) = _step_and_two_iterations(whole), _step_and_two_iterations(chunked)
    assert seen["syn"][:3] == [6, 2, 12]  # the forced plan really ran: 3, 1 and 6 classes of 2 rows
    assert max(seen["real"]) == 3         # real rows in passes of 3 (a class's 5 rows split across passes)
    assert one.grad.dtype == torch.float64 and one.backpropagated and many.backpropagated
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(many.grad, one.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(images_many, images_one, rtol=1e-10, atol=1e-12)


def test_chunks_of_an_active_segment_equal_one_pass(ten_classes):
    """A DASM-style segment (rows c·4 + 2, c·4 + 3 of every class): chunks index the segment's rows."""
    rows = (torch.arange(10).view(-1, 1) * 4 + torch.tensor([2, 3])).reshape(-1)
    results = []
    for plan in (ChunkPlan([list(range(10))], 50), ChunkPlan(UNEVEN, 3)):
        engine = _engine(ten_classes, "ipc=4", "batch_real=5", plan=plan, dtype=torch.float64)
        engine.set_active(rows, 2)
        before = engine.synthetic.images.detach().clone()
        results.append(_step_and_two_iterations(engine))
        outside = torch.ones(40, dtype=torch.bool)
        outside[rows] = False
        assert torch.equal(results[-1][1][outside], before[outside])  # other segments untouched
    (one, images_one), (many, images_many) = results
    assert many.grad.shape == (20, 3, 16, 16)
    torch.testing.assert_close(many.grad, one.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(images_many, images_one, rtol=1e-10, atol=1e-12)


def test_real_small_budget_chunks_equal_one_pass():
    data = _images(10, 20, 32)
    whole = _engine(data, "ipc=20", "batch_real=6")
    chunked = _engine(data, "ipc=20", "batch_real=6", "memory_budget=64MiB")
    probe = _engine(data, "memory_budget=64MiB")
    net = probe.new_network()
    assert probe.chunk_plan(net, [20] * 10, [6] * 10).num_chunks >= 3
    assert whole.chunk_plan(net, [20] * 10, [6] * 10).num_chunks == 1
    (one, images_one), (many, images_many) = _step_and_two_iterations(whole), _step_and_two_iterations(chunked)
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-5, atol=0)
    scale = one.grad.abs().max()
    torch.testing.assert_close(many.grad / scale, one.grad / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(images_many, images_one, rtol=1e-5, atol=1e-5)


def test_rows_per_forward_stay_bounded_as_classes_grow():
    # ConvNetW32 at 64 px: 60-90 rows fit 64MiB, so 10 classes of 30 rows already take several chunks
    peaks = {}
    for classes in (10, 40):
        engine = _engine(_images(classes, 6, 64), "model=ConvNetW32", "ipc=30", "init=noise", "batch_real=4",
                         "memory_budget=64MiB", "dsa_strategy=")
        seen = _record_batches(engine)
        engine.run_iteration(0)
        net = engine.new_network()
        grad_bytes, real_bytes = engine.row_bytes(net, True), engine.row_bytes(net, False)
        plan = engine.chunk_plan(net, [30] * classes, [4] * classes)
        allowed = (engine.memory_budget - plan.real_rows_per_pass * real_bytes) // grad_bytes
        syn = [n for n in seen["syn"] if n > 1]  # (1-row forwards: the one-off activation measurement)
        assert sum(syn) == 30 * classes and len(syn) == plan.num_chunks
        assert max(syn) <= allowed and max(seen["real"]) <= plan.real_rows_per_pass == 4
        peaks[classes] = (max(syn), plan.num_chunks)
    assert peaks[10][1] >= 3                      # even 10 classes do not fit one forward ...
    assert peaks[40][0] == peaks[10][0]           # ... and the largest forward does not grow with the classes ...
    assert peaks[40][1] >= 4 * peaks[10][1] - 1   # ... the number of chunks does


def test_real_rows_given_out_of_class_order_are_grouped_first(ten_classes):
    """Chunks slice the real rows by class: rows handed over shuffled give the sorted rows' step."""
    steps = []
    for shuffle in (False, True):
        engine = _engine(ten_classes, "ipc=2", "batch_real=5", plan=ChunkPlan(UNEVEN, 3), dtype=torch.float64)
        sample = engine.sample_real_index

        def shuffled(*a, sample=sample, shuffle=shuffle, **k):
            index, seg = sample(*a, **k)
            order = torch.randperm(len(index), generator=torch.Generator().manual_seed(5)) if shuffle else \
                torch.arange(len(index))
            return index[order], seg[order]
        engine.sample_real_index = shuffled
        steps.append(engine.method.compute(engine, 0))
    torch.testing.assert_close(steps[1].loss, steps[0].loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(steps[1].grad, steps[0].grad, rtol=1e-10, atol=1e-14)


def test_batchnorm_net_refuses_a_budget_it_cannot_be_chunked_under():
    data = _images(10, 10, 32)
    with pytest.raises(ValueError, match=r"memory_budget.*'ConvNetBN'.*BatchNorm statistics couple all classes"):
        _engine(data, "model=ConvNetBN", "ipc=10", "batch_real=6", "memory_budget=64MiB").run_iteration(0)


def test_batchnorm_net_runs_in_one_pass_whatever_the_planner_says(ten_classes):
    """A BN step is one forward of every real row and one of every synthetic row, whatever chunk_plan returns."""
    engine = _engine(ten_classes, "model=ConvNetBN", "ipc=2", "batch_real=5", plan=ChunkPlan(UNEVEN, 3))
    seen = _record_batches(engine)
    engine.method.compute(engine, 0)
    assert [n for n in seen["syn"] if n > 1] == [20] and [n for n in seen["real"] if n > 1] == [50]


def test_staging_on_the_cpu_is_a_plain_gather_of_normalised_rows(tmp_path):
    data = _images(4, 5, 8)
    array = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8,
                                      shape=tuple(data.images.shape))
    array[:] = data.images.numpy()
    array.flush()
    mapped = np.load(tmp_path / "images.npy", mmap_mode="c")  # copy-on-write: the file stays untouched
    data.images = torch.from_numpy(mapped)  # a memory map, as prepared datasets give
    engine = Distiller(build_config(overrides=[*FAST, "ipc=1"]), data)
    index = torch.tensor([3, 7, 11, 0, 19, 4, 8])
    bounds = [(0, 3), (3, 4), (4, 7)]
    staged = list(engine.real_passes(index, bounds))
    for (lo, hi), x in zip(bounds, staged):
        assert torch.equal(x, engine.real_images(index[lo:hi]))
    assert engine.stager is None  # no pinned buffer without CUDA
    out = torch.empty(5, 3, 8, 8, dtype=torch.uint8)
    view = gather_rows(data.images, index[:4], out)
    assert view.data_ptr() == out.data_ptr() and torch.equal(out[:4], data.images[index[:4]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging and side-stream copies need a CUDA GPU")
def test_cuda_staging_equals_real_images_and_reuses_its_pinned_buffers():
    data = _images(4, 40, 16)
    engine = Distiller(build_config(overrides=["device=cuda", "progress=false", "ipc=1"]), data)
    index = torch.randperm(160, generator=torch.Generator().manual_seed(1))
    bounds = [(lo, min(lo + 25, 160)) for lo in range(0, 160, 25)]
    for _ in range(2):
        staged = list(engine.real_passes(index, bounds))
        for (lo, hi), x in zip(bounds, staged):
            assert x.is_cuda and torch.equal(x, engine.real_images(index[lo:hi]))
        pointers = [b.data_ptr() for b in engine.stager._slots]
        assert all(b.is_pinned() for b in engine.stager._slots)
    assert [b.data_ptr() for b in engine.stager._slots] == pointers  # reused across calls, not reallocated
    rows = RealStager(data, "cuda").passes(index, [(0, 160)])
    assert torch.equal(next(rows), engine.real_images(index))


def test_a_packed_network_move_keeps_every_value_in_one_block_per_dtype():
    torch.manual_seed(0)
    net = get_model("ConvNetBN", 3, 10, (16, 16))
    reference = {name: t.clone() for name, t in net.state_dict().items()}
    assert module_to_device(net, "cpu", packed=True) is net
    for name, t in net.state_dict().items():
        assert torch.equal(t, reference[name]) and t.dtype == reference[name].dtype
    blocks = {t.dtype: t.untyped_storage().data_ptr() for t in net.state_dict().values()}
    assert all(t.untyped_storage().data_ptr() == blocks[t.dtype] for t in net.state_dict().values())
    assert set(blocks) == {torch.float32, torch.int64}  # parameters and running stats | num_batches_tracked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the packed pinned copy is a CUDA path")
def test_cuda_network_move_is_one_sync_free_copy_per_dtype():
    torch.manual_seed(0)
    net, reference = get_model("ConvNetBN", 3, 10, (16, 16)), get_model("ConvNetBN", 3, 10, (16, 16))
    reference.load_state_dict(net.state_dict())
    with count_host_syncs(cuda=True) as syncs:
        module_to_device(net, "cuda")
    syncs.assert_none("module_to_device")
    for (name, t), r in zip(net.state_dict().items(), reference.to("cuda").state_dict().values()):
        assert t.is_cuda and torch.equal(t, r), name
