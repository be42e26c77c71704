"""Benchmark fastdd batched K-means vs scikit-learn KMeans on CPU (and faiss on GPU when installed)."""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results, parse_args, time_fn  # noqa: E402

from fastdd.cluster import batched_kmeans, kmeans_plusplus  # noqa: E402
from fastdd.ops._registry import IMPLEMENTATIONS  # noqa: E402


def mixture(N, D, K, S=1, seed=0):
    """Rows from K overlapping Gaussian clusters per segment (centre scale 0.3 vs unit noise), grouped by segment."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.3 * torch.randn(S, K, D, generator=g)
    seg = torch.arange(S).repeat_interleave(N // S)
    comp = torch.randint(0, K, (seg.numel(),), generator=g)
    return (centers[seg, comp] + torch.randn(seg.numel(), D, generator=g)).contiguous(), seg


def sklearn_fit(X, k, init, iters, tol):
    from sklearn.cluster import KMeans
    km = KMeans(k, init=init if init is not None else "k-means++", n_init=1, max_iter=iters, tol=tol,
                algorithm="lloyd", random_state=0).fit(X)
    return km.inertia_, km.n_iter_


def faiss_fit(x, k, iters):  # pragma: no cover - GPU only, when faiss is installed
    import faiss
    km = faiss.Kmeans(x.shape[1], k, niter=iters, gpu=True, seed=0, min_points_per_centroid=1)
    km.train(x.cpu().numpy())
    return float(km.obj[-1]), iters


def run_case(res, args, dev, name, N, D, k, S, iters, tol, mode, threads):
    """mode 'lloyd': same k-means++ init for every provider and tol=0, so all run `iters` Lloyd iterations.
    mode 'fit': each provider seeds itself and stops at sklearn's default tol (full fit, n_init=1)."""
    x, seg = mixture(N, D, k, S)
    xd, segd = x.to(dev), seg.to(dev)
    n_s = N // S
    init = kmeans_plusplus(x, k, seg, S, generator=torch.Generator().manual_seed(0))
    gemm_t = time_fn(lambda: torch.addmm((init[0] ** 2).sum(1), xd[:n_s], init[0].to(dev).t(), alpha=-2), dev,
                     repeats=args.repeats)["median_s"] * S  # the assignment GEMM: a floor for one Lloyd iteration
    tol = 0.0 if mode == "lloyd" else tol
    out = {}

    def fastdd_run():
        r = batched_kmeans(xd, segd, S, k=k, iters=iters, tol=tol, generator=torch.Generator().manual_seed(0),
                           init=init.to(dev) if mode == "lloyd" else None)
        return float(r.inertia.double().sum()), r.n_iter

    impl = IMPLEMENTATIONS["kmeans_assign"]["cuda" if dev.startswith("cuda") else "cpu"].split(" ")[0]
    providers = {f"fastdd ({impl})": fastdd_run}
    X = x.numpy()
    parts = [X[s * n_s:(s + 1) * n_s] for s in range(S)]

    def sklearn_run():
        fits = [sklearn_fit(parts[s], k, init[s].numpy() if mode == "lloyd" else None, iters, tol) for s in range(S)]
        return sum(f[0] for f in fits), max(f[1] for f in fits)
    if not args.no_sklearn:
        providers["scikit-learn (CPU)" + (" per-class loop" if S > 1 else "")] = sklearn_run
    if dev.startswith("cuda") and S == 1:
        try:
            import faiss  # noqa: F401
            providers["faiss (GPU)"] = lambda: faiss_fit(xd, k, iters)
        except ImportError:
            print("faiss not installed: faiss row skipped")
    samples = {prov: [] for prov in providers}
    for prov, fn in providers.items():
        inertia, n_iter = fn()  # warm-up, and the inertia/iterations of this configuration
        out[prov] = dict(inertia=inertia, n_iter=n_iter)
    for _ in range(args.repeats):  # interleaved, so a busy shared machine slows every provider alike
        for prov, fn in providers.items():
            samples[prov].append(time_fn(fn, "cpu" if "CPU" in prov else dev, warmup=0, repeats=1)["median_s"])
    for prov, ts in samples.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else ts * 4
        out[prov].update(median_s=statistics.median(ts), p20_s=q[0], p80_s=q[3], repeats=len(ts),
                         load_average_1min=os.getloadavg()[0])
    ref = next((v for p, v in out.items() if p.startswith("scikit-learn")), None)
    for prov, v in out.items():
        per_iter = v["median_s"] / v["n_iter"]
        row = dict(case=name, mode=mode, N=N, D=D, K=k, S=S, iters=iters, tol=tol, provider=prov, threads=threads,
                   s_per_iter=per_iter,
                   gflops=2.0 * N * D * k / per_iter / 1e9, gbps=N * D * 4 / per_iter / 1e9,
                   gemm_floor_s=gemm_t, pct_of_floor=100 * gemm_t / per_iter, **v)
        if ref is not None:
            row["inertia_ratio_vs_sklearn"] = v["inertia"] / ref["inertia"]
            row["speedup_vs_sklearn"] = ref["median_s"] / v["median_s"]
            row["speedup_per_iter_vs_sklearn"] = (ref["median_s"] / ref["n_iter"]) / per_iter
        res.add(**row)


def main():
    import argparse
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--no-sklearn", action="store_true", help="time fastdd only")
    extra.add_argument("--threads", default=str(torch.get_num_threads()),
                       help="comma-separated CPU thread counts, applied to torch and to sklearn (threadpoolctl)")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    args = parse_args(__doc__, "benchmarks/results/kmeans.json")
    args.no_sklearn = known.no_sklearn
    dev = args.device
    # (name, N, D, k, S, lloyd iterations, also a full fit?) -- N is the total over S segments
    cases = [("N=10000 D=512 K=10", 10000, 512, 10, 1, 20, True),
             ("N=50000 D=2048 K=10", 50000, 2048, 10, 1, 10, False),
             ("N=50000 D=2048 K=100", 50000, 2048, 100, 1, 10, False),
             ("10 classes x 5000 x 2048, k=8", 50000, 2048, 8, 10, 10, True)]
    if args.quick:
        cases = [("quick N=2000 D=64 K=10", 2000, 64, 10, 1, 10, True),
                 ("quick 4 classes x 500 x 64, k=4", 2000, 64, 4, 4, 10, True)]
    res = Results("kmeans", dev)
    t0 = time.time()
    from threadpoolctl import threadpool_limits
    for threads in [int(t) for t in known.threads.split(",")]:
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            for name, N, D, k, S, iters, fit in cases:
                for mode in ("lloyd", "fit") if fit else ("lloyd",):
                    run_case(res, args, dev, name, N, D, k, S, iters if mode == "lloyd" else 300, 1e-4, mode,
                             threads)
    print(f"total {time.time() - t0:.0f}s; load average {os.getloadavg()}")
    res.write(args.out)


if __name__ == "__main__":
    main()
