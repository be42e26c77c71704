"""Benchmark fastdd.ops.mean_match (the DM loss) vs eager and compiled reference; GB/s, % of a streaming floor."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results, compiled, interleaved_times, make_modes, parse_args  # noqa: E402

import fastdd.ops  # noqa: E402
from fastdd.ops._registry import IMPLEMENTATIONS  # noqa: E402
from fastdd.reference import mean_match as ref  # noqa: E402

GPU_PENDING = "pending: no GPU machine in this session"
# (name, Nr, Ns, D, num_segments, real segments per syn segment, dtype); 256 real rows per class as in DM.
CASES = [
    ("CIFAR-10 IPC 50", 2560, 500, 2048, 10, 1, torch.float32),
    ("CIFAR-100 IPC 10", 25600, 1000, 2048, 100, 1, torch.float32),
    ("ImageNet-100 128px IPC 10 ConvNetD5 bf16", 25600, 1000, 2048, 100, 1, torch.bfloat16),  # 128·4·4 features
    ("robust DD CIFAR-10 IPC 10, 10x8 clusters", 2560, 100, 2048, 80, 8, torch.float32),
]


def _eager(real, real_seg, syn, syn_seg, num_segments, real_to_syn):
    return ref.mean_match(real, real_seg, syn, syn_seg, num_segments, real_to_syn)[0]


def _reference_unchecked(real, real_seg, syn, syn_seg, num_segments, real_to_syn):
    D = real.shape[1]
    mu_r = torch.zeros(num_segments, D, device=real.device).index_add_(0, real_seg, real.float())
    mu_s = torch.zeros(num_segments, D, device=real.device).index_add_(0, syn_seg, syn.float())
    n_r = torch.bincount(real_seg, minlength=num_segments).float()
    n_s = torch.bincount(syn_seg, minlength=num_segments).float()
    mu_r, mu_s = mu_r / n_r.clamp_min(1)[:, None], mu_s / n_s.clamp_min(1)[:, None]
    if real_to_syn is not None:
        mu_s, n_s = mu_s[real_to_syn], n_s[real_to_syn]
    diff = torch.where(((n_r > 0) & (n_s > 0))[:, None], mu_r - mu_s, 0.0)
    return diff.square().sum(1).to(real.dtype)


def providers(device):
    out = {"eager reference": _eager}
    comp = compiled(_reference_unchecked)
    if comp is not None:
        out["compiled reference"] = comp
    impl = IMPLEMENTATIONS["mean_match"]["cuda" if device.startswith("cuda") else "cpu"]
    out[f"fastdd ({impl.split(' ')[0]})"] = fastdd.ops.mean_match
    return out


def _inputs(Nr, Ns, D, S, k, dtype, device):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(Nr, D, generator=g).to(device, dtype)
    syn = torch.randn(Ns, D, generator=g).to(device, dtype)
    n_syn = S // k
    real_cls = torch.arange(Nr) * n_syn // Nr  # real rows sorted by class, as a class sampler yields them
    real_seg = real_cls * k + torch.randint(0, k, (Nr,), generator=g)  # cluster/domain ids unsorted in a class
    syn_seg = torch.arange(Ns) * n_syn // Ns
    real_to_syn = (torch.arange(S) // k).to(device) if k > 1 else None
    return real, real_seg.to(device), syn, syn_seg.to(device), S, real_to_syn


def _note_gpu_rows(path, device):
    """CPU runs leave a note that the GPU rows are pending; a GPU run removes it."""
    with open(path) as f:
        rows = json.load(f)
    rows = [r for r in rows if r.get("gpu") != GPU_PENDING]
    if device.startswith("cpu") and not any(r.get("device_type") == "cuda" for r in rows):
        rows.append({"bench": "mean_match", "device_type": "cuda", "gpu": GPU_PENDING,
                     "goals": ">= 80% of the bandwidth floor, >= 3x eager, >= 1.2x compiled reference (fwd+bwd)"})
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def plot_bars(res: Results, path: str) -> None:
    """Grouped bars: GB/s per case and provider, one panel per mode, floor (x.sum(0)) as a tick per case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install fastdd[plot])")
        return
    cases = list(dict.fromkeys(r["case"] for r in res.rows))
    provs = list(dict.fromkeys(r["provider"] for r in res.rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    width = 0.8 / len(provs)
    for ax, mode in zip(axes, ("fwd", "bwd", "fwd+bwd")):
        for j, prov in enumerate(provs):
            vals = [next((r["gbps"] for r in res.rows if r["case"] == c and r["provider"] == prov
                          and r["mode"] == mode), 0.0) for c in cases]
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=prov)
        floors = [next(r["floor_gbps"] for r in res.rows if r["case"] == c) for c in cases]
        ax.scatter([i + 0.4 - width / 2 for i in range(len(cases))], floors, marker="_", s=400, color="k",
                   label="floor: x.sum(0)", zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([c.replace(" IPC", "\nIPC").replace(", ", "\n") for c in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(mode, fontsize=9)
    axes[0].set_ylabel("GB/s (bytes a fused kernel must move)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean_match on {res.meta['device']}, torch {res.meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    args = parse_args(__doc__, "benchmarks/results/mean_match.json")
    dev = args.device
    cases = CASES if not args.quick else [("quick", 1024, 100, 256, 10, 1, torch.float32),
                                          ("quick map", 1024, 50, 256, 20, 4, torch.float32)]
    res = Results("mean_match", dev)
    provs = providers(dev)
    for name, Nr, Ns, D, S, k, dtype in cases:
        real, real_seg, syn, syn_seg, _, real_to_syn = _inputs(Nr, Ns, D, S, k, dtype, dev)
        es = real.element_size()
        flat = real.view(torch.float32)  # same bytes as `real`, streamed as fp32
        moved = {"fwd": (Nr + Ns) * (D * es + 8) + S * (4 * D + es),  # read real, syn, ids; write diff, loss
                 "bwd": S * (4 * D + es) + Ns * (D * es + 8)}  # read diff, grad; write syn grad
        moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
        runs = {("floor", None): lambda: flat.sum(0), ("sum all", None): lambda: flat.sum()}
        for prov, fn in provs.items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                sm = syn.detach().clone()  # DM: real features are detached, the syn images get gradients
                runs[(prov, mode)] = make_modes(fn, (real, real_seg, sm, syn_seg, S, real_to_syn), [sm], mode)
        load = os.getloadavg()[0]
        times = interleaved_times(runs, dev, args.repeats)
        floor_gbps = Nr * D * es / times.pop(("floor", None))["median_s"] / 1e9  # harness convention: x.sum(0)
        sum_all_gbps = Nr * D * es / times.pop(("sum all", None))["median_s"] / 1e9  # stricter: x.sum()
        case_rows = []
        for (prov, mode), t in times.items():
            gbps = moved[mode] / t["median_s"] / 1e9
            case_rows.append(res.add(
                case=name, Nr=Nr, Ns=Ns, D=D, S=S, real_to_syn=k > 1, dtype=str(dtype).split(".")[1],
                provider=prov, mode=mode, gbps=gbps, floor_gbps=floor_gbps, pct_of_floor=100 * gbps / floor_gbps,
                sum_all_gbps=sum_all_gbps, pct_of_sum_all=100 * gbps / sum_all_gbps, bytes=Nr * D * es,
                loadavg_1min=load, **t))
        base = {(r["provider"], r["mode"]): r["median_s"] for r in case_rows}
        for r in case_rows:
            r["speedup_vs_eager"] = base[("eager reference", r["mode"])] / r["median_s"]
            if ("compiled reference", r["mode"]) in base:
                r["speedup_vs_compiled"] = base[("compiled reference", r["mode"])] / r["median_s"]
            if r["provider"].startswith("fastdd"):
                print(f"{name} {r['mode']}: {r['pct_of_floor']:.0f}% of floor ({r['pct_of_sum_all']:.0f}% of x.sum()), "
                      f"{r['speedup_vs_eager']:.2f}x eager, "
                      f"{r.get('speedup_vs_compiled', float('nan')):.2f}x compiled")
    res.write(args.out)
    _note_gpu_rows(args.out, dev)
    plot_bars(res, args.plot or args.out.replace(".json", f"_{res.meta['device_type']}.png"))


if __name__ == "__main__":
    main()
