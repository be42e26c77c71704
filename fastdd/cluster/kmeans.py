"""Batched Lloyd's K-means with k-means++ seeding: every segment (class) clustered in one call, sklearn semantics."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from fastdd.ops import kmeans_assign, segment_mean


class KMeansResult(NamedTuple):
    labels: torch.Tensor     # int64 [N], cluster index within the row's segment, in [0, k)
    centroids: torch.Tensor  # [S, k, D]
    inertia: torch.Tensor    # [S], sum of squared distances of each segment's rows to their centroids
    n_iter: int              # Lloyd iterations run (the max over segments)


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, S: int) -> torch.Tensor:
    return torch.zeros(S, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    return _segment_sum(torch.ones_like(ids), ids, n)  # index_add_ is much cheaper than bincount on CPU


def _uniform(shape, generator, device, dtype=torch.float64) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _sqdist_to(xs: torch.Tensor, xnorm: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """[n, T] squared distances of the rows of xs to the candidate rows (clamped at 0)."""
    return torch.addmm(xnorm[:, None] + (cands * cands).sum(1)[None, :], xs, cands.t(), alpha=-2).clamp_min_(0)


def kmeans_plusplus(x: torch.Tensor, k: int, seg: Optional[torch.Tensor] = None, num_segments: int = 1,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy k-means++ seeding (sklearn's variant) inside every segment: ``[num_segments, k, D]`` initial centroids.

    Zeros for empty segments; each non-empty segment needs at least ``k`` rows. Deterministic given ``generator``.
    """
    if seg is None:
        seg = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    counts = _counts(seg, num_segments).tolist()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or any(0 < n < k for n in counts):
        raise ValueError(f"kmeans_plusplus: k must be a positive int no larger than any non-empty segment "
                         f"(sizes {counts}), got {k!r}")
    _, order = torch.sort(seg, stable=True)
    starts = [sum(counts[:s]) for s in range(num_segments)]
    return _kmeans_plusplus_grouped(x[order], starts, counts, k, generator)


def kmeans_plusplus_draws(num_segments: int, k: int, generator: Optional[torch.Generator] = None,
                          device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform numbers k-means++ seeding of ``num_segments`` segments consumes, ``(first [S],
    steps [k - 1, S, 2 + log k])``, drawn as ``batched_kmeans`` draws them. Slices ``(first[a:b], steps[:, a:b])``
    passed as ``draws`` seed segments a..b-1 exactly as one call over all segments would: clustering a
    dataset class chunk by class chunk gives the one-call result."""
    trials = 2 + int(math.log(k))
    return (_uniform(num_segments, generator, device),
            _uniform((max(k - 1, 0), num_segments, trials), generator, device))


def _kmeans_plusplus_grouped(x: torch.Tensor, starts: list[int], counts: list[int], k: int,
                             generator: Optional[torch.Generator] = None, draws=None) -> torch.Tensor:
    """``x`` grouped by segment (segment s owns rows ``starts[s] : starts[s] + counts[s]``). At each step,
    2 + log k candidates are drawn with probability ~ D(x)^2 and the one lowering the potential most is kept.
    All random draws are made up front (or given as ``draws``), so the result depends only on them."""
    S, D = len(counts), x.shape[1]
    centers = x.new_zeros(S, k, D)
    first, steps = draws if draws is not None else kmeans_plusplus_draws(S, k, generator, x.device)
    first, steps = first.to(x.device, torch.float64), steps.to(x.device, torch.float64)
    for s in range(S):
        n, a = counts[s], starts[s]
        if n == 0:
            continue
        xs = x[a:a + n]
        xnorm = (xs * xs).sum(1)
        idx = (first[s] * n).long().clamp_max(n - 1)
        centers[s, 0] = xs[idx]
        closest = _sqdist_to(xs, xnorm, centers[s, :1])[:, 0].double()
        pot = closest.sum()
        for c in range(1, k):
            cum = torch.cumsum(closest, 0)
            cand = torch.searchsorted(cum, steps[c - 1, s] * pot).clamp_max(n - 1)
            dist = torch.minimum(closest[:, None], _sqdist_to(xs, xnorm, xs[cand]).double())  # [n, T]
            pots = dist.sum(0)
            best = pots.argmin()
            pot, closest = pots[best], dist[:, best].contiguous()
            centers[s, c] = xs[cand[best]]
    return centers


def _assign(xs: torch.Tensor, centers: torch.Tensor, seg: torch.Tensor):
    if centers.shape[0] == 1:  # one segment: the plain search skips the segment bookkeeping
        return kmeans_assign(xs, centers[0])
    return kmeans_assign(xs, centers, seg)


def _relocate_empty(labels, sqdist, empty, starts, counts):
    """sklearn's rule: each empty cluster takes the point farthest from its centroid (one per empty cluster)."""
    labels = labels.clone()
    by_segment: dict[int, list[int]] = {}
    for s, j in empty.nonzero().tolist():
        by_segment.setdefault(s, []).append(j)
    for s, clusters in by_segment.items():
        n, a = counts[s], starts[s]
        far = sqdist[a:a + n].topk(min(len(clusters), n)).indices
        for j, i in zip(clusters, far.tolist()):
            labels[a + i] = j
    return labels


def batched_kmeans(x: torch.Tensor, seg: Optional[torch.Tensor] = None, num_segments: Optional[int] = None,
                   k: int = 8, *, iters: int = 300, tol: float = 1e-4, n_init: int = 1,
                   generator: Optional[torch.Generator] = None, init: Optional[torch.Tensor] = None,
                   draws: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> KMeansResult:
    """Lloyd's K-means run independently inside every segment of ``x [N, D]`` (``seg`` int64 [N], e.g. class ids).

    Mirrors ``sklearn.cluster.KMeans(algorithm="lloyd")`` per segment: greedy k-means++ seeding (or ``init``
    ``[S, k, D]``), stop when labels stop changing or the total squared centroid shift is ``<= tol * mean feature
    variance`` of the segment, a final assignment so labels match the returned centroids, empty clusters re-seeded
    at the point farthest from its centroid, and the best of ``n_init`` seedings (by inertia, per segment).
    A segment stops updating once it has converged, so results do not depend on what it is batched with.
    Deterministic given ``generator``, or given ``draws`` (from ``kmeans_plusplus_draws``, one seeding: n_init 1,
    no init) in place of it. Half-precision input is clustered in fp32. Empty segments get zero centroids and
    zero inertia; a non-empty segment with fewer than ``k`` rows is an error.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"batched_kmeans: x must be a 2-D floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"batched_kmeans: k must be a positive int, got {k!r}")
    for name, value in (("iters", iters), ("n_init", n_init)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batched_kmeans: {name} must be a positive int, got {value!r}")
    if not tol >= 0:
        raise ValueError(f"batched_kmeans: tol must be >= 0, got {tol!r}")
    N = x.shape[0]
    if seg is None:
        seg = torch.zeros(N, dtype=torch.int64, device=x.device)
        num_segments = 1 if num_segments is None else num_segments
    if num_segments is None:
        raise ValueError("batched_kmeans: num_segments is required when seg is given")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"batched_kmeans: num_segments must be a positive int, got {num_segments!r}")
    if not isinstance(seg, torch.Tensor) or seg.dtype != torch.int64 or seg.shape != (N,):
        raise ValueError(f"batched_kmeans: seg must be an int64 tensor [{N}], got "
                         f"{getattr(seg, 'dtype', type(seg).__name__)} of shape {tuple(getattr(seg, 'shape', ()))}")
    if seg.device != x.device:
        raise ValueError(f"batched_kmeans: seg is on {seg.device} but x is on {x.device}")
    S = num_segments
    if N and (int(seg.min()) < 0 or int(seg.max()) >= S):
        raise ValueError(f"batched_kmeans: seg ids must lie in [0, {S}), found values in "
                         f"[{int(seg.min())}, {int(seg.max())}]")
    counts_t = _counts(seg, S)
    counts = counts_t.tolist()
    small = [(s, n) for s, n in enumerate(counts) if 0 < n < k]
    if small:
        raise ValueError(f"batched_kmeans: k={k} exceeds the number of rows of segment {small[0][0]} "
                         f"({small[0][1]}); every non-empty segment needs at least k rows")
    if draws is not None:
        trials = 2 + int(math.log(k))
        shapes = tuple(tuple(getattr(d, "shape", ())) for d in draws) if isinstance(draws, (tuple, list)) else None
        if shapes != ((S,), (max(k - 1, 0), S, trials)):
            raise ValueError(f"batched_kmeans: draws must be (first [{S}], steps [{max(k - 1, 0)}, {S}, {trials}]) "
                             f"from kmeans_plusplus_draws, got shapes {shapes}")
        if init is not None or n_init != 1:
            raise ValueError("batched_kmeans: draws seed one k-means++ run: use it with n_init=1 and no init")
    if init is not None and tuple(init.shape) != (S, k, x.shape[1]):
        raise ValueError(f"batched_kmeans: init must have shape {(S, k, x.shape[1])}, got {tuple(init.shape)}")

    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sorted_seg, order = torch.sort(seg, stable=True)
    grouped = bool((order == torch.arange(N, device=x.device)).all()) if N else True
    xs = (x if grouped else x[order]).to(work_dtype).contiguous()
    starts = [0] * S
    for s in range(1, S):
        starts[s] = starts[s - 1] + counts[s - 1]
    # sklearn's tolerance: tol * mean feature variance = tol * mean_i ||x_i - mean||^2 / D, per segment
    tol_s = torch.zeros(S, dtype=torch.float64, device=x.device)
    if tol > 0:
        means = segment_mean(xs, sorted_seg, S)
        spread = kmeans_assign(xs, means[:, None, :], sorted_seg)[1].double()
        tol_s = _segment_sum(spread, sorted_seg, S) / (counts_t.clamp_min(1).double() * max(xs.shape[1], 1)) * tol

    best = None
    for run in range(n_init if init is None else 1):
        start = init.to(xs) if init is not None else _kmeans_plusplus_grouped(xs, starts, counts, k, generator, draws)
        result = _lloyd(xs, sorted_seg, S, k, start, iters, tol_s, starts, counts)
        if best is None:
            best = result
        else:
            better = result[2] < best[2]
            rows_better = better[sorted_seg]
            best = (torch.where(rows_better, result[0], best[0]),
                    torch.where(better[:, None, None], result[1], best[1]),
                    torch.where(better, result[2], best[2]), max(best[3], result[3]))
    labels_sorted, centroids, inertia, n_iter = best
    labels = labels_sorted if grouped else torch.empty_like(labels_sorted).index_copy_(0, order, labels_sorted)
    return KMeansResult(labels, centroids.to(x.dtype), inertia.to(x.dtype), n_iter)


def _lloyd(xs, seg, S, k, centers, iters, tol_s, starts, counts):
    done = torch.zeros(S, dtype=torch.bool, device=xs.device)
    nonempty_segment = torch.tensor([n > 0 for n in counts], device=xs.device)
    labels_old = None
    n_iter = 0
    for it in range(iters):
        n_iter = it + 1
        labels, sqdist = _assign(xs, centers, seg)
        flat = labels if S == 1 else seg * k + labels
        counts_flat = _counts(flat, S * k)
        empty = (counts_flat.view(S, k) == 0) & nonempty_segment[:, None]
        if bool(empty.any()):
            labels_moved = _relocate_empty(labels, sqdist, empty, starts, counts)
            flat = labels_moved if S == 1 else seg * k + labels_moved
            counts_flat = _counts(flat, S * k)
        new = segment_mean(xs, flat, S * k).view(S, k, -1)
        new = torch.where((counts_flat.view(S, k) > 0)[:, :, None], new, centers)
        shift = (new - centers).square().sum((1, 2))
        if labels_old is None:
            unchanged = torch.zeros(S, dtype=torch.bool, device=xs.device)
        else:
            unchanged = _segment_sum((labels != labels_old).to(torch.int64), seg, S) == 0
        centers = torch.where(done[:, None, None], centers, new)
        done = done | unchanged | (shift <= tol_s)
        if bool(done.all()):
            break
        labels_old = labels
    labels, sqdist = _assign(xs, centers, seg)
    inertia = _segment_sum(sqdist.double(), seg, S)
    return labels, centers, inertia, n_iter
