"""Benchmark fastdd.ops.segment_mean vs the eager and compiled reference; GB/s and % of the x.sum(0) floor."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results, compiled, make_modes, parse_args, time_fn  # noqa: E402

import fastdd.ops  # noqa: E402
from fastdd.ops._registry import IMPLEMENTATIONS  # noqa: E402
from fastdd.reference import segment_mean as ref  # noqa: E402


def _reference_unchecked(x, seg, num_segments):
    acc = torch.zeros(num_segments, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, seg, x.float())
    return (acc / torch.bincount(seg, minlength=num_segments).clamp_min(1)[:, None]).to(x.dtype)


def providers(device):
    out = {"reference": ref.segment_mean}
    comp = compiled(_reference_unchecked)
    if comp is not None:
        out["compiled reference"] = comp
    impl = IMPLEMENTATIONS["segment_mean"]["cuda" if device.startswith("cuda") else "cpu"]
    out[f"fastdd ({impl.split(' ')[0]})"] = fastdd.ops.segment_mean
    return out


def main():
    args = parse_args(__doc__, "benchmarks/results/segment_mean.json")
    dev = args.device
    cases = [(2560, 2048, 10), (25600, 2048, 100), (25600, 512, 100), (100000, 64, 1000)]
    if args.quick:
        cases = [(2560, 256, 10)]
    res = Results("segment_mean", dev)
    dtype = torch.float32
    for N, D, S in cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, D, generator=g).to(dev, dtype)
        seg = torch.sort(torch.randint(0, S, (N,), generator=g)).values.to(dev)
        es = x.element_size()
        floor_t = time_fn(lambda: x.sum(0), dev, repeats=args.repeats)["median_s"]
        floor_gbps = N * D * es / floor_t / 1e9
        for prov, fn in providers(dev).items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                xm = x.detach().clone()
                run = make_modes(fn, (xm, seg, S), [xm], mode)
                t = time_fn(run, dev, repeats=args.repeats)
                moved = {"fwd": N * D * es + N * 8 + S * D * es,
                         "bwd": S * D * es + N * 8 + N * D * es}
                moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
                gbps = moved[mode] / t["median_s"] / 1e9
                row = dict(case=f"N={N} D={D} S={S}", N=N, D=D, S=S, threads=torch.get_num_threads(),
                           load_avg_1min=os.getloadavg()[0], dtype=str(dtype).split(".")[1],
                           provider=prov, mode=mode, gbps=gbps, floor_gbps=floor_gbps,
                           pct_of_floor=100 * gbps / floor_gbps, bytes=N * D * es, **t)
                res.add(**row)
        ref_rows = {(r["mode"]): r["median_s"] for r in res.rows if r["case"] == f"N={N} D={D} S={S}"
                    and r["provider"] == "reference"}
        for r in res.rows:
            if r["case"] == f"N={N} D={D} S={S}":
                r["speedup_vs_reference"] = ref_rows[r["mode"]] / r["median_s"]
    res.write(args.out)
    suffix = f"_{res.meta['device_type']}" + (f"_{args.threads}thread" if args.threads else "")
    res.plot(args.plot or args.out.replace(".json", f"{suffix}.png"), x="bytes")


if __name__ == "__main__":
    main()
