"""Tests for fastdd.ops.kmeans_assign and fastdd.cluster.batched_kmeans: search, autograd, opcheck, sklearn."""
import numpy as np
import pytest
import torch

from conftest import TOLERANCES, requires_cuda, triton_or_skip
from fastdd.cluster import batched_kmeans, kmeans_plusplus
from fastdd.ops import kmeans_assign
from fastdd.reference import kmeans_assign as ref

SHAPES = [(1, 1, 1), (7, 3, 1), (33, 2047, 5), (300, 64, 10), (1000, 3, 37), (129, 17, 130)]  # (N, D, K)


def _inputs(N, D, K, dtype=torch.float32, S=None, seed=0, sort=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    shape = (K, D) if S is None else (S, K, D)
    c = torch.randn(*shape, generator=g, dtype=torch.float64)
    seg = None
    if S is not None:
        seg = torch.randint(0, max(S - 1, 1), (N,), generator=g)  # segment S-1 left empty
        if sort:
            seg = seg.sort().values
    return x.to(dtype), c.to(dtype), seg


def _brute(x, c, seg):
    """Exact float64 distances to every allowed centroid: [N, k]."""
    cents = c.double()[seg] if seg is not None else c.double().expand(x.shape[0], *c.shape)
    return (x.double()[:, None, :] - cents).square().sum(-1)


def _assert_nearest(x, c, seg, labels, sqdist, dtype):
    d = _brute(x, c, seg)
    assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
    assert sqdist.dtype == x.dtype and sqdist.shape == (x.shape[0],)
    assert int(labels.min()) >= 0 and int(labels.max()) < c.shape[-2]
    picked = d.gather(1, labels[:, None]).squeeze(1)
    best = d.min(1).values
    slack = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert (picked <= best + slack * (1 + best)).all()  # a near-tie may pick either centroid
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(sqdist.double(), picked, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


@pytest.mark.parametrize("N,D,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unsegmented_matches_bruteforce_and_reference(N, D, K, dtype):
    x, c, _ = _inputs(N, D, K, dtype)
    labels, sqdist = kmeans_assign(x, c)
    _assert_nearest(x, c, None, labels, sqdist, dtype)
    ref_sqdist, ref_labels = ref.kmeans_assign(x, c)
    agree = (labels == ref_labels).float().mean()
    assert agree >= (1.0 if dtype == torch.float64 else 0.99)
    same = labels == ref_labels
    torch.testing.assert_close(sqdist[same], ref_sqdist[same], **TOLERANCES[dtype])


@pytest.mark.parametrize("N,D,K,S", [(1, 1, 1, 1), (50, 5, 3, 4), (400, 33, 8, 10), (64, 300, 1, 2)])
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segmented_only_picks_own_segment(N, D, K, S, sort, dtype):
    x, c, seg = _inputs(N, D, K, dtype, S=S, sort=sort)
    labels, sqdist = kmeans_assign(x, c, seg)
    _assert_nearest(x, c, seg, labels, sqdist, dtype)
    _, ref_labels = ref.kmeans_assign(x, c, seg)
    assert (labels == ref_labels).float().mean() >= 0.99


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
def test_reference_segmented_is_nearest_in_own_segment_for_any_chunking(chunk):
    x, c, seg = _inputs(97, 9, 4, torch.float64, S=6)
    labels = ref._nearest_in_segment(x, c, seg, chunk=chunk)  # chunk < S*k still takes one row at a time
    _assert_nearest(x, c, seg, labels, (x - c[seg, labels]).square().sum(1), torch.float64)


def test_segmented_equals_per_segment_calls():
    x, c, seg = _inputs(300, 20, 6, S=5)
    labels, sqdist = kmeans_assign(x, c, seg)
    for s in range(5):
        rows = seg == s
        if rows.any():
            ls, ds = kmeans_assign(x[rows], c[s])
            assert torch.equal(labels[rows], ls)
            torch.testing.assert_close(sqdist[rows], ds)


def test_hand_computed_case_and_ties():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0], [9.0, 10.0]])
    labels, sqdist = kmeans_assign(x, c)
    assert labels.tolist() == [0, 1, 0, 2]  # x[2] is equidistant from c0 and c1: lowest index wins
    assert sqdist.tolist() == [0.0, 0.0, 1.0, 1.0]
    seg = torch.tensor([1, 1, 0, 0])
    cs = torch.stack([c[:2], c[1:]])
    labels, sqdist = kmeans_assign(x, cs, seg)
    assert labels.tolist() == [0, 0, 0, 1] and sqdist.tolist() == [4.0, 0.0, 1.0, 164.0]


def test_empty_input():
    labels, sqdist = kmeans_assign(torch.ones(0, 3), torch.ones(2, 3))
    assert labels.shape == (0,) and sqdist.shape == (0,)


@pytest.mark.parametrize("segmented", [False, True])
def test_gradcheck_float64(segmented):
    x, c, seg = _inputs(12, 4, 3, torch.float64, S=3 if segmented else None)
    x.requires_grad_(True)
    c.requires_grad_(True)

    def f(a, b):
        return kmeans_assign(a, b, seg)[1]
    assert torch.autograd.gradcheck(f, (x, c))
    assert torch.autograd.gradgradcheck(f, (x, c))


def test_labels_are_not_differentiable():
    x, c, _ = _inputs(5, 3, 2)
    x.requires_grad_(True)
    labels, sqdist = kmeans_assign(x, c)
    assert not labels.requires_grad and sqdist.requires_grad


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("segmented", [False, True])
def test_opcheck(requires_grad, segmented):
    x, c, seg = _inputs(40, 9, 4, S=3 if segmented else None)
    x.requires_grad_(requires_grad)
    c.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastdd.kmeans_assign.default, (x, c, seg))


def test_torch_compile_fullgraph():
    x, c, seg = _inputs(50, 8, 4, S=3)

    def f(t, cc):
        labels, sqdist = kmeans_assign(t * 2.0, cc, seg)
        return sqdist.sum() + labels.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c), f(x, c))


@pytest.mark.parametrize("bad, match, exc", [
    (dict(x=torch.ones(5)), "x must be 2-D", ValueError),
    (dict(x=torch.ones(5, 2, dtype=torch.long)), "x must be a floating-point", TypeError),
    (dict(centroids=torch.ones(3, 4)), "centroids have 4 features but x has 2", ValueError),
    (dict(centroids=torch.ones(3, 2, dtype=torch.float64)), "centroids dtype", TypeError),
    (dict(centroids=torch.ones(1, 3, 2)), "centroids must be 2-D", ValueError),
    (dict(seg=torch.zeros(5, dtype=torch.long)), "centroids must be 3-D", ValueError),
    (dict(centroids=torch.ones(2, 3, 2), seg=torch.zeros(5)), "seg must be int64", TypeError),
    (dict(centroids=torch.ones(2, 3, 2), seg=torch.zeros(4, dtype=torch.long)), "seg has 4 entries", ValueError),
    (dict(centroids=torch.ones(2, 3, 2), seg=torch.tensor([0, 1, 2, 0, 0])), r"seg ids must lie in \[0, 2\)",
     ValueError),
    (dict(centroids=torch.ones(0, 2)), "at least one centroid", ValueError),
    (dict(x=torch.ones(5, 2, device="meta")), "all tensors must be on one device", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = dict(x=torch.ones(5, 2), centroids=torch.ones(3, 2), seg=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        kmeans_assign(**args)


def test_raw_op_checks_ids_too():
    with pytest.raises(ValueError, match="seg ids must lie"):
        torch.ops.fastdd.kmeans_assign(torch.ones(3, 2), torch.ones(2, 1, 2), torch.tensor([0, 5, 1]))


@pytest.mark.interpreter
@pytest.mark.parametrize("N,D,K,S", [(1, 1, 1, None), (37, 5, 4, None), (70, 33, 70, None), (90, 20, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_launcher_under_interpreter(N, D, K, S, dtype):
    triton_or_skip()
    from fastdd.triton import kmeans_assign as tri
    x, c, seg = _inputs(N, D, K, dtype, S=S)
    sqdist, labels = tri.kmeans_assign(x, c, seg)
    _assert_nearest(x, c, seg, labels, sqdist, dtype)


# ---- batched K-means -------------------------------------------------------------------------------------------

sklearn = pytest.importorskip("sklearn")
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.datasets import load_digits, make_blobs  # noqa: E402


def _sk_inertia(X, k, n_init, seeds=(0, 1, 2)):
    return float(np.mean([KMeans(k, n_init=n_init, random_state=s).fit(X).inertia_ for s in seeds]))


def test_blobs_per_class_matches_sklearn():
    parts, segs = [], []
    for s, (n, k) in enumerate([(300, 4), (500, 4), (200, 4)]):
        X, _ = make_blobs(n, 8, centers=k, cluster_std=1.0, random_state=s)
        parts.append(X.astype(np.float32))
        segs.append(np.full(n, s))
    x, seg = torch.from_numpy(np.concatenate(parts)), torch.from_numpy(np.concatenate(segs))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # classes interleaved
    res = batched_kmeans(x[perm], seg[perm], 3, k=4, n_init=2, generator=torch.Generator().manual_seed(0))
    assert res.centroids.shape == (3, 4, 8) and res.inertia.shape == (3,)
    for s, X in enumerate(parts):
        sk = _sk_inertia(X, 4, n_init=2)
        assert abs(float(res.inertia[s]) - sk) <= 0.01 * sk
        rows = seg[perm] == s
        _, d = kmeans_assign(x[perm][rows], res.centroids[s])
        torch.testing.assert_close(d.double().sum(), res.inertia[s].double(), rtol=1e-4, atol=1e-3)
        assert torch.equal(res.labels[rows], kmeans_assign(x[perm][rows], res.centroids[s])[0])


def test_digits_within_few_percent_of_sklearn():
    X = load_digits().data.astype(np.float32)
    res = batched_kmeans(torch.from_numpy(X), k=10, n_init=3, generator=torch.Generator().manual_seed(0))
    sk = _sk_inertia(X, 10, n_init=3)
    assert float(res.inertia[0]) <= 1.03 * sk
    assert float(res.inertia[0]) >= 0.95 * sk


def test_same_init_same_iterations_as_sklearn():
    X, _ = make_blobs(600, 5, centers=6, cluster_std=3.0, random_state=3)
    X = X.astype(np.float64)
    x = torch.from_numpy(X)
    init = kmeans_plusplus(x, 6, generator=torch.Generator().manual_seed(1))
    res = batched_kmeans(x, k=6, init=init)
    sk = KMeans(6, init=init[0].numpy(), n_init=1).fit(X)
    np.testing.assert_allclose(res.centroids[0].numpy(), sk.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert abs(float(res.inertia[0]) - sk.inertia_) <= 1e-9 * sk.inertia_
    assert res.n_iter == sk.n_iter_


def test_empty_cluster_reseeded_at_farthest_point_like_sklearn():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [9.0, 9.0]])
    init = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # the third centroid attracts nothing
    res = batched_kmeans(torch.from_numpy(X), k=3, init=torch.from_numpy(init)[None], iters=1)
    sk = KMeans(3, init=init, n_init=1, max_iter=1).fit(X)
    np.testing.assert_allclose(res.centroids[0].numpy(), sk.cluster_centers_, atol=1e-12)
    assert res.centroids[0, 2].tolist() == [9.0, 9.0]  # the point farthest from its centroid
    assert torch.bincount(res.labels, minlength=3).min() > 0


def test_batched_result_independent_of_batching_and_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    seg = torch.randint(0, 4, (400,), generator=g)
    init = torch.randn(4, 5, 6, generator=g)
    res = batched_kmeans(x, seg, 4, k=5, init=init)
    for s in range(4):
        rows = seg == s
        one = batched_kmeans(x[rows], k=5, init=init[s:s + 1])
        torch.testing.assert_close(res.centroids[s], one.centroids[0])
        assert torch.equal(res.labels[rows], one.labels)


def test_deterministic_from_generator():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    seg = torch.arange(300) % 3
    a = batched_kmeans(x, seg, 3, k=4, generator=torch.Generator().manual_seed(7))
    b = batched_kmeans(x, seg, 3, k=4, generator=torch.Generator().manual_seed(7))
    c = batched_kmeans(x, seg, 3, k=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)


def test_empty_segment_and_half_precision():
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    seg = torch.cat([torch.zeros(30, dtype=torch.long), torch.full((30,), 2)])
    res = batched_kmeans(x.bfloat16(), seg, 3, k=3, generator=torch.Generator().manual_seed(0))
    assert res.centroids.dtype == torch.bfloat16
    assert torch.equal(res.centroids[1].float(), torch.zeros(3, 4)) and float(res.inertia[1]) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be a positive int"),
    (dict(k=11), r"k=11 exceeds the number of rows of segment 0 \(10\)"),
    (dict(iters=0), "iters must be a positive int"),
    (dict(tol=-1.0), "tol must be >= 0"),
    (dict(num_segments=None), "num_segments is required"),
    (dict(seg=torch.zeros(20)), "seg must be an int64 tensor"),
    (dict(seg=torch.full((20,), 5)), r"seg ids must lie in \[0, 2\)"),
    (dict(init=torch.zeros(2, 3, 4)), "init must have shape"),
])
def test_kmeans_bad_input(kwargs, match):
    args = dict(x=torch.randn(20, 3), seg=torch.arange(20) // 10, num_segments=2, k=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        batched_kmeans(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [None, 10])
def test_cuda_matches_bruteforce(dtype, S):
    x, c, seg = _inputs(5000, 2048, 8 if S else 100, dtype, S=S)
    labels, sqdist = kmeans_assign(x.cuda(), c.cuda(), None if seg is None else seg.cuda())
    _assert_nearest(x, c, seg, labels.cpu(), sqdist.cpu(), dtype)
    res = batched_kmeans(x.cuda().float(), None if seg is None else seg.cuda(), S, k=8,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.inertia).all()


def test_kmeans_plusplus_per_segment_picks_data_points():
    x = torch.randn(90, 4, generator=torch.Generator().manual_seed(0))
    seg = torch.arange(90) % 3
    init = kmeans_plusplus(x, 5, seg, 3, generator=torch.Generator().manual_seed(0))
    assert init.shape == (3, 5, 4)
    for s in range(3):
        rows = x[seg == s]
        assert all(bool((rows == c).all(1).any()) for c in init[s])  # every seed is a row of its own segment
        assert torch.unique(init[s], dim=0).shape[0] == 5
    with pytest.raises(ValueError, match="k must be a positive int no larger"):
        kmeans_plusplus(x, 31, seg, 3)


def test_draws_slices_seed_segments_as_one_call_does():
    """kmeans_plusplus_draws sliced per segment range: clustering two halves of the segments separately gives
    the labels (and, to fp32 summation order, the centroids) of one call over all of them with the generator the
    draws came from."""
    from fastdd.cluster import kmeans_plusplus_draws
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g)
    seg = torch.randint(0, 6, (600,), generator=g)
    one = batched_kmeans(x, seg, 6, k=4, generator=torch.Generator().manual_seed(3))
    first, steps = kmeans_plusplus_draws(6, 4, torch.Generator().manual_seed(3))
    for lo, hi in ((0, 2), (2, 6)):
        rows = (seg >= lo) & (seg < hi)
        part = batched_kmeans(x[rows], seg[rows] - lo, hi - lo, k=4, draws=(first[lo:hi], steps[:, lo:hi]))
        assert torch.equal(part.labels, one.labels[rows])
        torch.testing.assert_close(part.centroids, one.centroids[lo:hi], rtol=1e-6, atol=1e-6)  # sum order


def test_draws_of_the_wrong_shape_or_with_n_init_are_refused():
    from fastdd.cluster import kmeans_plusplus_draws
    x, seg = torch.randn(40, 3), torch.arange(40) % 2
    draws = kmeans_plusplus_draws(3, 4)
    with pytest.raises(ValueError, match="draws must be"):
        batched_kmeans(x, seg, 2, k=4, draws=draws)
    with pytest.raises(ValueError, match="n_init=1"):
        batched_kmeans(x, seg, 2, k=4, n_init=2, draws=kmeans_plusplus_draws(2, 4))
