"""DASM in class chunks equals DASM in one pass across a segment boundary (active rows, difficulty pool), on gm
and on dm; the scorer reads the training set in bounded batches."""
import pytest
import torch

from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config, difficulty
from fastdd.distill.memory import ChunkPlan
from test_chunked_gm import UNEVEN, engine_for, record_chunks
from test_chunked_robust import record_dm_chunks

DASM = ["method=dasm", "segments=2", "ipc=4", "iterations=2", "score_epochs=2", "p_max=0.5", "checkpoint_every=0"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_gm_base_in_chunks_equals_one_pass_across_segments(digits):
    torch.set_num_threads(1)
    engines = [engine_for(digits, *DASM, "base=gm", chunks=c) for c in ([list(range(10))], UNEVEN)]
    seen = record_chunks(engines[1], engines[1].method.base)
    pools = []
    for engine in engines:
        engine.run(callback=lambda e, logs: pools.append(e.real_pool))
    assert seen == UNEVEN * 4  # 2 iterations × 2 inner steps, the second iteration in segment 2
    assert pools[0] is None and pools[1] is not None and len(pools[1]) < len(digits)  # segment 2: the window
    assert torch.equal(pools[1], pools[3])
    torch.testing.assert_close(engines[1].synthetic.images, engines[0].synthetic.images, rtol=1e-9, atol=1e-12)
    assert torch.equal(engines[1].generator.get_state(), engines[0].generator.get_state())


def test_dm_base_in_chunks_equals_one_pass_across_segments(digits):
    torch.set_num_threads(1)
    overrides = ["progress=false", "device=cpu", "model=ConvNetW32", "batch_real=8", *DASM, "base=dm"]
    engines, seen = [], []
    for chunks, real_rows in (([list(range(10))], 80), (UNEVEN, 3)):
        engine = Distiller(build_config(overrides=overrides), digits)
        engine.chunk_plan = lambda *a, chunks=chunks, real_rows=real_rows, **k: ChunkPlan(chunks, real_rows)
        seen.append(record_dm_chunks(engine))
        engine.run()
        engines.append(engine)
    assert seen == [[20, 20], [2 * len(c) for c in UNEVEN] * 2]  # 2 active rows per class in each segment
    assert engines[1].real_pool is not None
    torch.testing.assert_close(engines[1].synthetic.images, engines[0].synthetic.images, rtol=1e-4, atol=1e-6)


def test_score_samples_reads_bounded_batches(digits):
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    batches = []
    net.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    losses = difficulty.score_samples(net, digits, torch.device("cpu"), batch_size=100)
    assert max(batches) == 100 and sum(batches) == len(digits)
    x = digits.normalize(digits.images, device=torch.device("cpu"))
    expect = torch.nn.functional.cross_entropy(net(x), torch.as_tensor(digits.labels), reduction="none")
    torch.testing.assert_close(losses, expect, rtol=1e-5, atol=1e-6)
