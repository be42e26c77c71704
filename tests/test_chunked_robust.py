"""Robust DD in class chunks (forced uneven plans and a real memory budget) equals one pass, on DM and on GM:
the objective, its logs and the image gradient."""
import functools

import pytest
import torch

from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.memory import ChunkPlan
from fastdd.distill.methods.class_grads import real_pass, syn_pass
from fastdd.distill.methods.gm import SYN_GRAPH_FACTOR
from test_chunked_gm import UNEVEN, engine_for, record_chunks, tiny_classes

DM_FAST = ["progress=false", "device=cpu", "method=robust", "model=ConvNetW32", "batch_real=12", "ipc=3", "k=6"]
GM_KEYS = ["base=gm", "k=3", "beta=0.6", "alpha=0.5", "class_chunk=100"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def clustered(engine):
    """Fixed random cluster ids for every training image (k of them per class)."""
    m = engine.method
    m.cluster_ids = torch.randint(0, m.args.k, (len(engine.train),), generator=torch.Generator().manual_seed(1))
    m.clustered_at = 0
    return engine


def dm_engine(train, *extra, chunks=None, real_rows=5):
    engine = Distiller(build_config(overrides=[*DM_FAST, *extra]), train)
    if chunks is not None:
        engine.chunk_plan = lambda *a, **k: ChunkPlan([list(c) for c in chunks], real_rows)
    return engine


def record_dm_chunks(engine):
    """Log the synthetic rows of every DM chunk pass (what engine.embed sees with grad)."""
    seen, embed = [], engine.embed
    engine.embed = lambda net, x: (seen.append(x.shape[0]) if x.requires_grad else None) or embed(net, x)
    return seen


@pytest.mark.parametrize("assignment,alpha,beta", [("kmeans", 0.5, 0.5), ("nearest-synthetic", 0.6, 1.0)])
def test_dm_forced_uneven_chunks_equal_one_pass(digits, assignment, alpha, beta):
    torch.set_num_threads(1)
    extra = [f"assignment={assignment}", f"alpha={alpha}", f"beta={beta}"]
    one = clustered(dm_engine(digits, *extra, chunks=[list(range(10))], real_rows=120))
    chunked = clustered(dm_engine(digits, *extra, chunks=UNEVEN, real_rows=5))
    seen_one, seen = record_dm_chunks(one), record_dm_chunks(chunked)
    outs = [e.method.compute(e, 1) for e in (one, chunked)]
    assert seen_one == [30] and seen == [3 * len(c) for c in UNEVEN]
    assert outs[0].grad.abs().sum() > 0
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(float(outs[1].loss), float(outs[0].loss), rtol=1e-5, atol=0)
    for key in ("dm_loss", "cvar", "worst_cluster_loss"):
        assert float(outs[1].logs[key]) == pytest.approx(float(outs[0].logs[key]), rel=1e-5)
    assert outs[1].logs["empty_cells"] == outs[0].logs["empty_cells"] > (0 if assignment == "kmeans" else -1)


def test_dm_small_memory_budget_chunks_and_equals_one_pass(digits):
    torch.set_num_threads(1)
    extra = ["ipc=300", "init=noise", "beta=0.7", "model=ConvNet"]  # 3 classes per 64MiB chunk
    one = clustered(dm_engine(digits, *extra, "memory_budget=100GB"))
    small = clustered(dm_engine(digits, *extra, "memory_budget=64MiB"))
    seen_one, seen = record_dm_chunks(one), record_dm_chunks(small)
    outs = [e.method.compute(e, 1) for e in (one, small)]
    assert seen_one == [3000] and len(seen) >= 3 and sum(seen) == 3000
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(float(outs[1].loss), float(outs[0].loss), rtol=1e-5, atol=0)


def gm_step(engine):
    engine.method.prepare(engine)
    clustered(engine)
    state = engine.method.begin_iteration(engine, 1)
    return engine.method.compute_inner(engine, 1, state, 0)


@pytest.mark.parametrize("extra", [[], ["distance=cos", "aug=dsa", "step_per_class=false"]])
def test_gm_forced_uneven_chunks_equal_one_pass(digits, extra):
    torch.set_num_threads(1)
    one = engine_for(digits, *GM_KEYS, *extra, "method=robust", chunks=[list(range(10))])
    chunked = engine_for(digits, *GM_KEYS, *extra, "method=robust", chunks=UNEVEN)
    seen_one, seen = record_chunks(one, one.method.base), record_chunks(chunked, chunked.method.base)
    outs = [gm_step(e) for e in (one, chunked)]
    assert seen_one == [list(range(10))] and seen == UNEVEN
    assert outs[0].grad.abs().sum() > 0
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(float(outs[1].value), float(outs[0].value), rtol=1e-12, atol=0)
    for key in ("gm_loss", "cvar", "worst_cluster_loss", "empty_cells"):
        assert float(outs[1].logs[key]) == pytest.approx(float(outs[0].logs[key]), rel=1e-12)
    assert outs[0].logs["cvar"] > 0


def test_gm_small_memory_budget_chunks_and_equals_one_pass(digits):
    torch.set_num_threads(1)
    extra = [*GM_KEYS, "method=robust", "ipc=32", "batch_syn_max=0", "batch_real=64", "inner_loop=1"]  # 3 a chunk
    one, small = engine_for(digits, *extra, "memory_budget=100GB"), engine_for(digits, *extra, "memory_budget=64MiB")
    seen_one, seen = record_chunks(one, one.method.base), record_chunks(small, small.method.base)
    outs = [gm_step(e) for e in (one, small)]
    assert seen_one == [list(range(10))] and len(seen) >= 3 and sum(seen, []) == list(range(10))
    torch.testing.assert_close(outs[1].grad, outs[0].grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(float(outs[1].value), float(outs[0].value), rtol=1e-12, atol=0)


def test_gm_outer_iteration_in_chunks_equals_one_pass(digits):
    torch.set_num_threads(1)
    engines = [engine_for(digits, *GM_KEYS, "method=robust", chunks=c) for c in ([list(range(10))], UNEVEN)]
    for engine in engines:
        engine.method.prepare(engine)
        clustered(engine)
        engine.run_iteration(1)
    torch.testing.assert_close(engines[1].synthetic.images, engines[0].synthetic.images, rtol=1e-9, atol=1e-12)
    assert torch.equal(engines[1].generator.get_state(), engines[0].generator.get_state())



def test_gm_plan_counts_the_cell_gradients():
    # robust on gm holds K cell gradients per class besides gm's two: ConvNet's (1.2 MB each) must fit too
    torch.set_num_threads(1)
    budget, K = 64 * 2**20, 3
    engine = Distiller(build_config(overrides=[*DM_FAST, *GM_KEYS, f"k={K}", "model=ConvNet", "ipc=1", "factor=1",
                                               "batch_real=4", "memory_budget=64MiB"]), tiny_classes(48, per_class=8))
    seen = record_chunks(engine, engine.method.base)
    clustered(engine)
    state = engine.method.begin_iteration(engine, 1)
    engine.method.compute_inner(engine, 1, state, 0)
    weight_bytes = sum(p.numel() * p.element_size() for p in state.grads.params)
    syn_bytes = engine.row_bytes(state.net, True, functools.partial(syn_pass, distance="idc"), ("gm-syn", "idc"))
    real_bytes = engine.row_bytes(state.net, True, real_pass, "gm-real")
    assert len(seen) >= 2 and sum(seen, []) == list(range(48))
    for chunk in seen:
        assert len(chunk) * ((2 + K) * weight_bytes + SYN_GRAPH_FACTOR * syn_bytes + 4 * real_bytes) <= budget


@pytest.mark.parametrize("embedding", ["pixels", "random-net"])
def test_clustering_features_read_in_chunks_equal_one_pass(digits, monkeypatch, embedding):
    import fastdd.distill.methods.robust as robust_module
    monkeypatch.setattr(robust_module, "EMBED_CHUNK", 500)  # 1438 training digits: 3 reads, the last one short
    engine = dm_engine(digits, f"embedding={embedding}")
    reads, real_images = [], engine.real_images
    engine.real_images = lambda index: reads.append(len(index)) or real_images(index)
    state = engine.generator.get_state()
    feats = engine.method.train_embeddings(engine)
    assert reads == [500, 500, 438]
    engine.generator.set_state(state)
    x = real_images(torch.arange(len(digits)))
    expect = x.flatten(1) if embedding == "pixels" else engine.embed_real(engine.new_network(), x)
    torch.testing.assert_close(feats, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embedding", ["pixels", "random-net"])
def test_clustering_in_class_chunks_gives_the_one_call_ids(digits, embedding):
    """A memory budget that fits ~2 classes' features: K-means runs per class chunk (only that chunk's features
    held) and the ids equal one batched call over all classes seeded from the same generator state."""
    ids, chunks = [], []
    for budget in (None, 2 * 180):  # None: the engine's budget (one chunk); then rows that fit ~2 classes
        engine = dm_engine(digits, f"embedding={embedding}")
        m = engine.method
        width = 64 if embedding == "pixels" else m.train_embeddings(engine).shape[1]
        if budget is not None:
            engine.memory_budget = budget * width * robust_module_constant()
        engine.generator.manual_seed(5)
        plan = m.cluster_chunks(engine, m.embedding_network(engine) if embedding == "random-net" else None,
                                torch.bincount(engine.train.labels.long(), minlength=10).tolist())
        engine.generator.manual_seed(5)
        m.cluster(engine, 0)
        ids.append(m.cluster_ids.clone())
        chunks.append(plan)
    assert len(chunks[0]) == 1 and len(chunks[1]) >= 4
    assert all(c1 - c0 <= 2 for c0, c1 in chunks[1])
    assert torch.equal(ids[0], ids[1])
    assert sorted(set(ids[0].tolist())) == list(range(6))  # k = 6 clusters used


def robust_module_constant():
    from fastdd.distill.methods.robust import CLUSTER_BYTES_PER_FEATURE
    return CLUSTER_BYTES_PER_FEATURE


def test_clustering_gives_the_ids_and_generator_state_of_one_batched_call(digits):
    """cluster() (draws first, then chunks) against the one-call code it replaced: a fresh embedding network
    from the engine generator, then batched_kmeans over every class with that generator."""
    from fastdd.cluster import batched_kmeans
    engine = dm_engine(digits)
    m = engine.method
    engine.memory_budget = 1  # one class per chunk
    sizes = torch.bincount(engine.train.labels.long(), minlength=10).tolist()
    assert len(m.cluster_chunks(engine, m.embedding_network(engine), sizes)) == 10
    engine.generator.manual_seed(7)
    m.cluster(engine, 0)
    after = engine.generator.get_state()
    engine.generator.manual_seed(7)
    feats = m.train_embeddings(engine)
    expect = batched_kmeans(feats, engine.train.labels.long(), 10, m.args.k, iters=m.args.kmeans_iters,
                            generator=engine.generator)
    assert torch.equal(m.cluster_ids, expect.labels)
    assert torch.equal(engine.generator.get_state(), after)


def test_batchnorm_embedding_networks_cluster_in_one_chunk(digits):
    """BN features depend on which images share a pass: however small the budget, one chunk."""
    engine = dm_engine(digits, "embedding_model=ConvNetBN")
    m = engine.method
    engine.memory_budget = 1
    sizes = torch.bincount(engine.train.labels.long(), minlength=10).tolist()
    assert m.cluster_chunks(engine, m.embedding_network(engine), sizes) == [(0, 10)]
    assert len(m.cluster_chunks(engine, dm_engine(digits).method.embedding_network(engine), sizes)) == 10
