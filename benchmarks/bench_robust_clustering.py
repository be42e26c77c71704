"""Robust's K-means clustering of the training set: peak memory and time under a small memory_budget vs one chunk."""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dm_iteration import _timed  # noqa: E402
from harness import Results  # noqa: E402

from fastdd.data import from_tensors  # noqa: E402
from fastdd.distill import Distiller, build_config  # noqa: E402
from fastdd.distill.memory import release_freed_memory  # noqa: E402


def engines(data, embedding: str, budgets: list[str], k: int):
    out = {}
    for budget in budgets:
        cfg = build_config(overrides=["progress=false", "device=cpu", "method=robust", "model=ConvNet", "ipc=1",
                                      f"k={k}", f"embedding={embedding}", f"memory_budget={budget}"])
        engine = Distiller(cfg, data)
        engine.method.prepare(engine)
        out[budget] = engine
    return out


def cluster_once(engine) -> tuple[float, float, torch.Tensor]:
    """Seconds and peak resident memory above the start (MiB) of one clustering from a fixed generator state."""
    engine.generator.manual_seed(0)
    release_freed_memory()
    seconds, peak = _timed(lambda: engine.method.cluster(engine, 0), "cpu")
    return seconds, float("nan") if peak is None else peak, engine.method.cluster_ids


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/robust_clustering.json")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budgets", default="8GB,128MiB")
    p.add_argument("--embeddings", default="pixels,random-net")
    p.add_argument("--quick", action="store_true", help="10 classes, 16 px, 2 repeats (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.classes, args.per_class, args.size, args.repeats = 10, 40, 16, 2
    g = torch.Generator().manual_seed(0)
    n = args.classes * args.per_class
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    data = from_tensors(images, torch.arange(n) % args.classes, num_classes=args.classes)
    res = Results("robust_clustering", "cpu")
    budgets = [b for b in args.budgets.split(",") if b]
    for embedding in [e for e in args.embeddings.split(",") if e]:
        built = engines(data, embedding, budgets, k=4)
        samples = {b: ([], []) for b in budgets}
        ids = {}
        for rep in range(args.repeats + 1):  # interleaved; the first round is warm-up
            for budget, engine in built.items():
                seconds, peak, ids[budget] = cluster_once(engine)
                if rep:
                    samples[budget][0].append(seconds)
                    samples[budget][1].append(peak)
        same = all(torch.equal(ids[budgets[0]], ids[b]) for b in budgets)
        for budget, engine in built.items():
            m = engine.method
            net = m.embedding_network(engine)
            chunks = m.cluster_chunks(engine, net, torch.bincount(data.labels.long(), minlength=args.classes).tolist())
            secs, peaks = samples[budget]
            res.add(case=f"{args.classes} classes x {args.per_class}, 3x{args.size}px, uint8", embedding=embedding,
                    memory_budget=budget, budget_bytes=engine.memory_budget, class_chunks=len(chunks),
                    median_s=statistics.median(secs), min_s=min(secs), max_s=max(secs), repeats=len(secs),
                    peak_rss_above_start_mib=max(peaks), ids_equal_across_budgets=same,
                    load_avg_1m=os.getloadavg()[0])
    res.write(args.out)


if __name__ == "__main__":
    main()
