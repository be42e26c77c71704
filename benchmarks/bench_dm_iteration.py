"""DM iteration: fastdd's batched engine vs the per-class reference-style loop, same data; s/iter and peak memory."""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FASTDD_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CASES = {  # name: (channels, size, ipc, batch_real, source)
    "mnist": (1, 28, 10, 256, "shared MNIST t10k"),
    "cifar": (3, 32, 50, 256, "random uint8 stand-in (CIFAR-10 not available offline)"),
}


def _dataset(case: str):
    from fastdd.data import from_tensors, load_dataset
    channels, size, _, _, _ = CASES[case]
    if case == "mnist":
        return load_dataset("mnist", split="test", root=os.path.join(SHARED, "data", "mnist-t10k"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5000, channels, size, size), generator=g, dtype=torch.uint8)
    return from_tensors(images, torch.arange(10).repeat(500), name="cifar-shape")


def _reference_iteration(train, syn, opt, ipc, batch_real, model, gen, device):
    from fastdd.augment import SiameseAugment
    from fastdd.augment.reference_ops import apply_group
    from fastdd.models import get_model
    net = get_model(model, train.channels, train.num_classes, train.image_size).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    augment = SiameseAugment()
    loss = torch.tensor(0.0, device=device)
    for c in range(train.num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:batch_real]]
        img_real = train.normalize(train.images[idx], device=device)
        img_syn = syn[c * ipc:(c + 1) * ipc]
        draw = augment.draw(1, train.image_size, generator=gen, device=device)
        output_real = net.embed(apply_group(img_real, draw, 0)).detach()
        output_syn = net.embed(apply_group(img_syn, draw, 0))
        loss = loss + torch.sum((output_real.mean(0) - output_syn.mean(0)) ** 2)
    opt.zero_grad()
    loss.backward()
    opt.step()


def worker(provider: str, case: str, iterations: int, channels_last: bool, micro_batch: int) -> dict:
    from fastdd.distill import Distiller, build_config
    channels, size, ipc, batch_real, _ = CASES[case]
    train = _dataset(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = build_config(overrides=[f"ipc={ipc}", f"batch_real={batch_real}", "progress=false", f"device={device}",
                                  f"channels_last={str(channels_last).lower()}", f"micro_batch={micro_batch}"])
    engine = Distiller(cfg, train)
    gen = torch.Generator().manual_seed(0)

    def step(i):
        if provider == "fastdd":
            engine.method.iteration(engine, i)
        else:
            _reference_iteration(train, engine.syn.images, engine.optimizer, ipc, batch_real, cfg.model, gen, device)
        if device == "cuda":
            torch.cuda.synchronize()

    step(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds_per_iteration": sorted(times)[len(times) // 2], "all_seconds": times, "peak_memory_mb": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/dm_iteration.json")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--cases", default="mnist,cifar")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--worker", nargs=2, metavar=("PROVIDER", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.iterations, args.channels_last, args.micro_batch)))
        return
    res = Results("dm_iteration", "cuda" if torch.cuda.is_available() else "cpu")
    for case in args.cases.split(","):
        measured = {}
        for provider in ("reference loop", "fastdd"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, case,
                   "--iterations", str(args.iterations), "--micro-batch", str(args.micro_batch)]
            cmd += ["--channels-last"] if args.channels_last and provider == "fastdd" else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            measured[provider] = json.loads(out.stdout.strip().splitlines()[-1])
        channels, size, ipc, batch_real, source = CASES[case]
        for provider, m in measured.items():
            res.add(case=case, shape=f"{channels}x{size}x{size}", ipc=ipc, batch_real=batch_real, classes=10,
                    data=source, provider=provider, model="ConvNet", channels_last=args.channels_last and provider == "fastdd",
                    micro_batch=args.micro_batch, load_avg_1min=os.getloadavg()[0], **m,
                    speedup_vs_reference=measured["reference loop"]["seconds_per_iteration"] / m["seconds_per_iteration"],
                    memory_ratio_vs_reference=m["peak_memory_mb"] / measured["reference loop"]["peak_memory_mb"])
    res.write(args.out)


if __name__ == "__main__":
    main()
