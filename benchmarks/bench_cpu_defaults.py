"""Ablation behind the CPU `auto` defaults: dm and gm steps with channels_last and micro_batch on/off, interleaved."""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_dm_iteration import load_case_data  # noqa: E402
from harness import Results  # noqa: E402

# name -> (method, overrides); the dm rows at MNIST shape (IPC 10, batch_real 256), gm at IDC's short settings
VARIANTS = {
    "dm NCHW, micro_batch 256 (old default)": ("dm", ["channels_last=false", "micro_batch=256"]),
    "dm channels_last, micro_batch 256": ("dm", ["channels_last=true", "micro_batch=256"]),
    "dm NCHW, micro_batch auto": ("dm", ["channels_last=false"]),
    "dm auto (channels_last, micro_batch 20)": ("dm", []),
    "gm auto (NCHW)": ("gm", []),
    "gm channels_last": ("gm", ["channels_last=true"]),
}
GM = ["model=ConvNetW32", "batch_real=64", "method_args={inner_loop: 2, n_data: 128}"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_defaults.json"))
    args = p.parse_args()
    from fastdd.distill import Distiller, build_config
    train, source = load_case_data("mnist", 1, 28, 10, 500)
    engines = {}
    for name, (method, extra) in VARIANTS.items():
        base = ["ipc=10", "progress=false", "device=cpu", f"method={method}"]
        base += GM if method == "gm" else ["batch_real=256"]
        engine = Distiller(build_config(overrides=base + extra), train)
        engine.method.prepare(engine)
        engines[name] = engine
    samples = {name: [] for name in engines}
    load_before = os.getloadavg()[0]
    for i in range(args.warmup + args.iterations):  # A B C ...: machine noise falls on every variant
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.method.iteration(engine, i)
            if i >= args.warmup:
                samples[name].append(time.perf_counter() - t0)
    res = Results("cpu_defaults", "cpu")
    medians = {name: statistics.median(times) for name, times in samples.items()}
    for name, times in samples.items():
        method = VARIANTS[name][0]
        baseline = "dm NCHW, micro_batch 256 (old default)" if method == "dm" else "gm auto (NCHW)"
        cfg = engines[name].config
        res.add(variant=name, method=method, data=source, channels_last=cfg.channels_last,
                micro_batch=cfg.micro_batch, iterations=len(times), warmup=args.warmup, median_s=medians[name],
                min_s=min(times), max_s=max(times), all_seconds=times, speedup_vs_baseline=medians[baseline] /
                medians[name], baseline=baseline, load_avg_1min_before=load_before,
                load_avg_1min_after=os.getloadavg()[0], threads=torch.get_num_threads())
    res.write(args.out)


if __name__ == "__main__":
    main()
