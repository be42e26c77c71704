"""Robust DD iteration vs DM iteration in the same process (interleaved), plus the cost of one re-clustering."""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FASTDD_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
PROVIDERS = {  # name: (method, method keys)
    "dm": ("dm", []),
    "robust kmeans": ("robust", ["assignment=kmeans", "k=4", "alpha=0.5", "beta=0.5", "recluster_every=0"]),
    "robust nearest-synthetic": ("robust", ["assignment=nearest-synthetic", "alpha=0.5", "beta=0.5"]),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _data(case: str):
    from fastdd.data import load_dataset
    from fastdd.distill.methods.robust_data import subpop_data
    pool = load_dataset("mnist", split="test", root=os.path.join(SHARED, "data", "mnist-t10k"))
    if case == "mnist":
        return pool, "shared MNIST t10k (10,000 images)"
    return subpop_data(pool, "rotate")[0], "subpop-mnist train split of the shared t10k pool (8,000 images)"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/robust_iteration.json")
    p.add_argument("--case", default="mnist", choices=("mnist", "subpop"))
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--model", default="ConvNet")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from fastdd.distill import Distiller, build_config
    train, source = _data(args.case)
    engines = {}
    for name, (method, keys) in PROVIDERS.items():
        cfg = build_config(overrides=[f"method={method}", f"ipc={args.ipc}", f"batch_real={args.batch_real}",
                                      f"model={args.model}", "progress=false", f"device={args.device}", *keys])
        engine = Distiller(cfg, train)
        engine.method.prepare(engine)
        engines[name] = engine
    device = engines["dm"].device
    rob = engines["robust kmeans"]
    t0 = time.perf_counter()
    rob.method.cluster(rob, 0)  # the first clustering (timed: the cost of one re-clustering)
    _sync(device)
    cluster_s = time.perf_counter() - t0
    times = {name: [] for name in engines}
    for it in range(args.repeats + 1):  # interleaved so load changes on a shared box hit every provider alike
        for name, engine in engines.items():
            _sync(device)
            t0 = time.perf_counter()
            engine.method.iteration(engine, it + 1)
            _sync(device)
            if it:  # iteration 0 is warm-up
                times[name].append(time.perf_counter() - t0)
    res = Results("robust_iteration", args.device)
    dm_s = statistics.median(times["dm"])
    for name, samples in times.items():
        med = statistics.median(samples)
        row = dict(case=args.case, data=source, ipc=args.ipc, batch_real=args.batch_real, classes=10,
                   model=args.model, provider=name, seconds_per_iteration=med, all_seconds=samples,
                   ratio_vs_dm=med / dm_s, load_avg_1min=os.getloadavg()[0])
        if name == "robust kmeans":
            row.update(recluster_seconds=cluster_s, recluster_images=len(train),
                       amortised_ratio_vs_dm_R100=(med + cluster_s / 100) / dm_s)
        res.add(**row)
    res.write(args.out)


if __name__ == "__main__":
    main()
