"""Benchmark fastdd.ops.norm_act_pool vs eager GroupNorm+ReLU+AvgPool2d and the compiled reference; GB/s, % of floor."""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results, compiled, make_modes, parse_args, time_fn  # noqa: E402

import fastdd.ops  # noqa: E402
from fastdd.ops._registry import IMPLEMENTATIONS  # noqa: E402
from fastdd.reference import norm_act_pool as ref  # noqa: E402

EPS = 1e-5
# (network layer, C, H, W) of the tensor entering each block's norm -> act -> pool tail.
LAYERS = [("ConvNet-3@32 L1", 128, 32, 32), ("ConvNet-3@32 L2", 128, 16, 16), ("ConvNet-3@32 L3", 128, 8, 8),
          ("ConvNet-3@28 L1", 128, 28, 28), ("ConvNet-3@28 L2", 128, 14, 14), ("ConvNet-3@28 L3", 128, 7, 7),
          ("ConvNetD5@128 L1", 128, 128, 128), ("ConvNetD5@128 L2", 128, 64, 64)]
# ConvNetD5's layers 3-5 (32, 16, 8 px) have ConvNet-3@32's shapes.
GOAL = ("ConvNet-3@32 L1", 2560, "nchw")


def eager(x, w, b):
    return F.avg_pool2d(F.relu(F.group_norm(x, x.shape[1], w, b, EPS)), 2, 2)


def _reference(x, w, b):
    return ref.norm_act_pool(x, w, b, EPS, 2)[0]


def providers(device):
    out = {"eager": eager}
    comp = compiled(_reference)
    if comp is not None:
        out["compiled reference"] = comp
    impl = IMPLEMENTATIONS["norm_act_pool"]["cuda" if device.startswith("cuda") else "cpu"]
    out[f"fastdd ({impl.split(' ')[0]})"] = lambda x, w, b: fastdd.ops.norm_act_pool(x, w, b, EPS)
    return out


def moved_bytes(x, mode):
    """Bytes a fused kernel must move: fwd reads x and writes out (x/4); bwd reads x and grad, writes dx."""
    nx = x.numel() * x.element_size()
    fwd, bwd = nx + nx // 4, nx + nx // 4 + nx
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}[mode]


def floor_gbps(x, dev, repeats):
    """Streaming-read rate on this tensor (CPU: x.sum over a [rows, 2048] view; GPU: copy read+write)."""
    flat = x.reshape(-1)[: (x.numel() // 2048) * 2048].view(-1, 2048)
    if dev.startswith("cuda"):
        y = torch.empty_like(flat)
        return 2 * flat.numel() * flat.element_size() / time_fn(lambda: y.copy_(flat), dev, repeats=repeats)[
            "median_s"] / 1e9
    return flat.numel() * flat.element_size() / time_fn(lambda: flat.sum(0), dev, repeats=repeats)["median_s"] / 1e9


def cases(args, dev):
    if args.quick:
        return [("ConvNet-3@32 L1", 128, 32, 32, 32, "nchw"), ("ConvNet-3@32 L1", 128, 32, 32, 32, "nhwc")]
    out = []
    for N in (256, 2560):
        for name, C, H, W in LAYERS:
            out.append((name, C, H, W, N, "nchw"))
        out.append(("ConvNet-3@32 L1", 128, 32, 32, N, "nhwc"))
    return out


def main():
    args = parse_args(__doc__, "benchmarks/results/norm_act_pool.json")
    dev = args.device
    # Eager fwd+bwd holds ~6 tensors of x's size; larger cases are skipped and listed.
    max_bytes = float(os.environ.get("BENCH_MAX_GB", "1.5" if dev == "cpu" else "6")) * 1e9
    res = Results("norm_act_pool", dev)
    dtype = torch.float32
    skipped = []
    for name, C, H, W, N, layout in cases(args, dev):
        nbytes = N * C * H * W * torch.finfo(dtype).bits // 8
        label = f"{name} N={N} {layout}"
        if nbytes > max_bytes:
            skipped.append(f"{label} ({nbytes / 1e9:.1f} GB > BENCH_MAX_GB)")
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, H, W, generator=g).to(dev, dtype)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.rand(C, generator=g).add_(0.5).to(dev, dtype)
        b = torch.randn(C, generator=g).mul_(0.5).to(dev, dtype)
        repeats = args.repeats if nbytes < 2**28 else max(3, args.repeats // 5)
        fl = floor_gbps(x, dev, repeats)
        times = {}
        torch._dynamo.reset()  # fresh compile per shape: recompiles would otherwise hit dynamo's cache limit
        for prov, fn in providers(dev).items():
            for mode in ("fwd", "fwd+bwd"):
                xm, wm, bm = (t.detach().clone() for t in (x, w, b))
                xm = xm.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
                try:
                    run = make_modes(fn, (xm, wm, bm), [xm, wm, bm], mode)
                    t = time_fn(run, dev, warmup=1 if nbytes >= 2**28 else 3, repeats=repeats)
                except torch.OutOfMemoryError:
                    skipped.append(f"{label} {prov} {mode} (out of memory)")
                    run = None
                    torch.cuda.empty_cache()
                    continue
                times[(prov, mode)] = t["median_s"]
                gbps = moved_bytes(x, mode) / t["median_s"] / 1e9
                res.add(case=label, layer=name, N=N, C=C, H=H, W=W, layout=layout, dtype="float32",
                        provider=prov, mode=mode, gbps=gbps, floor_gbps=fl, pct_of_floor=100 * gbps / fl,
                        bytes=nbytes, load_avg_1min=os.getloadavg()[0], **t)
                del run, xm, wm, bm
        for r in res.rows:
            if r["case"] == label:
                if ("eager", r["mode"]) in times:
                    r["speedup_vs_eager"] = times[("eager", r["mode"])] / r["median_s"]
                if ("compiled reference", r["mode"]) in times:
                    r["speedup_vs_compiled"] = times[("compiled reference", r["mode"])] / r["median_s"]
        del x
    res.write(args.out)
    _mark_gpu_pending(args.out, dev)
    for s in skipped:
        print(f"skipped {s}")
    goal = [r for r in res.rows if (r["layer"], r["N"], r["layout"]) == GOAL and r["mode"] == "fwd"
            and r["provider"].startswith("fastdd")]
    for r in goal:
        print(f"goal ({GOAL[0]} N={GOAL[1]} fwd, no_grad): {r.get('speedup_vs_eager', float('nan')):.2f}x eager, "
              f"{r['pct_of_floor']:.0f}% of floor")
    res.plot(args.plot or args.out.replace(".json", f"_{res.meta['device_type']}.png"), x="bytes",
             series=("provider", "mode", "layout"))


def _mark_gpu_pending(path, dev):
    """Keeps one `status: pending` row for the GPU until a CUDA run writes real rows."""
    with open(path) as f:
        rows = json.load(f)
    real_gpu = any(r.get("device_type") == "cuda" and r.get("status") != "pending" for r in rows)
    rows = [r for r in rows if r.get("status") != "pending"]
    if not real_gpu:
        rows.append({"bench": "norm_act_pool", "device_type": "cuda", "status": "pending",
                     "note": "GPU rows pending: run `python benchmarks/bench_norm_act_pool.py` on a CUDA machine "
                             "(goals: >= 80% of the copy-bandwidth floor and >= 1.3x the compiled reference)"})
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
