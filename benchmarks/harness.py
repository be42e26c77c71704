"""Benchmark harness: times ops per provider and mode, reports GB/s vs a bandwidth floor, writes JSON rows and a PNG."""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup=3, repeats=15, min_time=0.0) -> dict:
    """Median/p20/p80 seconds of `fn()` after warm-up; repeats grow until `min_time` total is spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else [samples[0]] * 4
    return {"median_s": statistics.median(samples), "p20_s": q[0], "p80_s": q[3], "repeats": len(samples)}


def interleaved_times(runs: dict, device, repeats: int, warmup: int = 3, prime: bool = True) -> dict:
    """Like time_fn for several callables, timed round-robin (A B A B ...) so that load from other processes on
    a shared machine falls on every provider alike. With `prime`, each timed call follows an untimed one of the
    same callable, so every provider meets the cache state it leaves itself (for inputs that fit in L3)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            if prime:
                fn()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[key].append(time.perf_counter() - t0)
    out = {}
    for key, v in samples.items():
        q = statistics.quantiles(v, n=5) if len(v) >= 2 else [v[0]] * 4
        out[key] = {"median_s": statistics.median(v), "p20_s": q[0], "p80_s": q[3], "min_s": min(v),
                    "max_s": max(v), "repeats": len(v)}
    return out


def time_device(fn, device="cpu", warmup=3, repeats=20, flush_bytes=256 * 2**20) -> dict:
    """Median/min/max seconds of `fn()`. CUDA: CUDA-event timing, the L2 cache flushed (a buffer larger than
    any L2 zeroed) before every call, outside the timed window. CPU: wall clock."""
    if torch.device(device).type != "cuda":
        samples = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    else:
        flush = torch.empty(flush_bytes // 4, device=device)
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": len(samples)}


def make_modes(fn, inputs, grad_inputs, mode):
    """A zero-arg callable for `mode` in fwd | bwd | fwd+bwd; `grad_inputs` are the inputs that need grads."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    for t in grad_inputs:
        t.requires_grad_(True)
    if mode == "bwd":
        out = fn(*inputs)
        grad_out = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, grad_inputs, grad_out, retain_graph=True)

    def fwd_bwd():
        out = fn(*inputs)
        return torch.autograd.grad(out, grad_inputs, torch.ones_like(out))
    return fwd_bwd


def bandwidth_floor_gbps(device="cpu", nbytes=256 * 2**20, repeats=15) -> float:
    """GB/s of the device's plain streaming read (x.sum(0)) on CPU, a device-to-device copy on GPU."""
    n = nbytes // 4
    x = torch.randn(n // 2048, 2048, device=device)
    if torch.device(device).type == "cuda":
        y = torch.empty_like(x)
        t = time_fn(lambda: y.copy_(x), device, repeats=repeats)["median_s"]
        return 2 * x.numel() * 4 / t / 1e9
    t = time_fn(lambda: x.sum(0), device, repeats=repeats)["median_s"]
    return x.numel() * 4 / t / 1e9


def sgemm_peak_flops(device="cpu", n=None, repeats=10) -> float:
    """FLOP/s of an fp32 n×n matmul (n: 8192 on GPU, 2048 on CPU) under torch's current precision settings."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)["median_s"]
    return 2 * n ** 3 / t


def mean_std(values) -> dict:
    """Mean, population std and count of a list of per-seed figures (experiment tables)."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def compiled(fn):
    """torch.compile(fn), or None where compile cannot run here."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # pragma: no cover
        return None


class Results:
    """Collects benchmark rows keyed by device/torch/date and merges them into a JSON file."""

    def __init__(self, bench: str, device="cpu"):
        self.bench = bench
        self.device = str(device)
        self.meta = {"bench": bench, "device": device_name(device), "device_type": torch.device(device).type,
                     "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        full = {**self.meta, **row}
        self.rows.append(full)
        keys = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(keys, flush=True)
        return full

    def write(self, path: str) -> None:
        existing = []
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        mine = {(r["device"], r["torch"]) for r in self.rows}
        kept = [r for r in existing if (r.get("device"), r.get("torch")) not in mine]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(kept + self.rows, f, indent=1)
        print(f"wrote {len(self.rows)} rows to {path}")

    def plot(self, path: str, x: str, y: str = "gbps", series=("provider", "mode"), title=None) -> bool:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot (pip install fastdd[plot])")
            return False
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict = {}
        for r in self.rows:
            if y in r and x in r:
                groups.setdefault(" ".join(str(r[k]) for k in series), []).append((r[x], r[y]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title or f"{self.bench} on {self.meta['device']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")
        return True


def parse_args(description: str, default_out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=default_out, help="JSON file the rows are merged into")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
