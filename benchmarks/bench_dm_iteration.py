"""DM iteration: fastdd's default engine vs main_DM.py's per-class loop on the reference's modules, timed interleaved."""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Results, sgemm_peak_flops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FASTDD_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CASES = {  # name: (dataset, channels, size, ipc)
    "mnist-ipc10": ("mnist", 1, 28, 10),
    "cifar10-ipc10": ("cifar10", 3, 32, 10),
    "cifar10-ipc50": ("cifar10", 3, 32, 50),
    "rotmnist-ipc10": ("rotmnist", 1, 28, 10),
}
# fastdd methods timed beside dm (interleaved, same data and batch_real): sgs needs a multi-domain set
CASE_METHODS = {"rotmnist-ipc10": ("sgs", "robust")}
METHOD_ARGS = {"sgs": {"lambda_sh": 1.0, "lambda_div": 100.0, "tau": 0.5, "holdout_domain": "75"}, "robust": {}}
SMOKE_CASE = {"smoke": ("random", 3, 16, 2)}
BATCH_REAL, SMOKE_BATCH_REAL = 256, 4


def load_case_data(dataset: str, channels: int, size: int, num_classes: int = 10, per_class: int = 500,
                   make_on=None):
    """The MNIST test split from the shared cache when present, else random uint8 images of the same shape
    (generated on `make_on`, e.g. the GPU for large sets, and kept on the host as a dataset is)."""
    from fastdd.data import from_tensors, load_dataset
    mnist_root = os.path.join(SHARED, "data", "mnist-t10k")
    if dataset == "rotmnist":  # Rotated MNIST (0..75 degrees, 75 held out) from the t10k digits or random ones
        from fastdd.data.domains import rotated_mnist
        from fastdd.distill.methods.sgs_data import domain_generalization_data
        digits, source = load_case_data("mnist", channels, size, num_classes, per_class // 6 + 1, make_on)
        return (domain_generalization_data(rotated_mnist(digits), "75", test_fraction=0.1)[0],
                f"Rotated MNIST (6 domains, '75' held out) from {source}")
    if dataset == "mnist" and os.path.isdir(mnist_root):
        return load_dataset("mnist", split="test", root=mnist_root), "MNIST t10k (shared cache)"
    g = torch.Generator(device=make_on or "cpu").manual_seed(0)
    images = torch.randint(0, 256, (num_classes * per_class, channels, size, size), generator=g,
                           dtype=torch.uint8, device=make_on or "cpu").cpu()
    source = ("random uint8 images (smoke)" if dataset == "random"
              else f"random uint8 stand-in for {dataset} (not available offline)")
    labels = torch.arange(num_classes).repeat(per_class)
    return from_tensors(images, labels, name=f"{dataset}-shape", num_classes=num_classes), source


class ReferenceLoop:
    """main_DM.py as it runs: the whole training set normalised on the device, a fresh ConvNet of nn modules
    (GroupNorm(C, C), ReLU, AvgPool2d) per iteration, per-class sampling, DSA and forward passes, one SGD step,
    loss.item()."""

    def __init__(self, train, syn_init: torch.Tensor, ipc: int, batch_real: int, device, seed: int = 0,
                 model: str = "ConvNet"):
        from fastdd.augment import SiameseAugment
        self.train, self.ipc, self.batch_real, self.device, self.model = train, ipc, batch_real, device, model
        self.images_all = train.normalize(train.images, device=device).contiguous()
        self.indices_class = [torch.nonzero(train.labels == c).flatten() for c in range(train.num_classes)]
        self.image_syn = syn_init.detach().clone().contiguous().requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.image_syn], lr=10.0 if ipc >= 100 else 1.0, momentum=0.5)
        self.augment = SiameseAugment()
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        from fastdd.models import get_model
        from fastdd.reference.dm_loop import reference_dm_loss
        train = self.train
        net = get_model(self.model, train.channels, train.num_classes, train.image_size, fused=False).to(self.device)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        real_by_class = [self.images_all[idx[torch.randperm(len(idx), generator=self.generator)[:self.batch_real]]]
                         for idx in self.indices_class]
        draw = self.augment.draw(train.num_classes, train.image_size, generator=self.generator)
        loss = reference_dm_loss(net, real_by_class, self.image_syn, self.ipc, draw)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def conv_flops_per_image(channels: int, num_classes: int, image_size, model: str = "ConvNet") -> int:
    """Multiply-adds ×2 of the ConvNet's convolutions for one image (norm, activation, pooling are memory-bound)."""
    from fastdd.models import get_model
    net = get_model(model, channels, num_classes, image_size, fused=False)
    flops = []

    def count(module, inputs, output):
        flops.append(2 * module.in_channels * module.out_channels * 9 * output.shape[2] * output.shape[3])
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net.embed(torch.zeros(1, channels, *image_size))
    for h in hooks:
        h.remove()
    return sum(flops)


def step_flops(channels: int, size: int, ipc: int, batch_real: int, num_classes: int = 10,
               model: str = "ConvNet") -> int:
    """Real images: one forward. Synthetic images: forward plus the input-gradient backward (same FLOPs);
    the network's weights are frozen, so no weight gradients."""
    per_image = conv_flops_per_image(channels, num_classes, (size, size), model)
    return per_image * num_classes * (batch_real + 2 * ipc)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(step, device) -> tuple[float, float | None]:
    """Seconds of one step and its peak memory above what was held when it started (MiB): CUDA allocator
    peak on a GPU; on the CPU the peak resident set (VmHWM, reset before the step) above the resident set."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_status_kb("VmRSS") if _reset_peak_rss() else None
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _proc_status_kb("VmHWM") if base is not None else None
        extra = (peak - base) / 1024 if peak is not None else None
    return seconds, extra


def profile_table(step, iterations: int = 2, rows: int = 12) -> list[dict]:
    """The ops where `step` spends its time (torch.profiler, self CPU time per iteration, share of the total)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [dict(op=e.key, self_s_per_iteration=e.self_cpu_time_total / 1e6 / iterations,
                 share=e.self_cpu_time_total / total, calls_per_iteration=e.count / iterations)
            for e in events[:rows]]


def measure_case(name: str, spec, device: str, iterations: int, warmup: int, batch_real: int, peak_flops: float,
                 num_classes: int = 10, model: str = "ConvNet", time_left=None, profile: bool = False) -> list[dict]:
    """Rows for fastdd's engine and the reference loop on one shape, timed A B A B; `time_left()` (seconds)
    stops the timed loop early, never before 2 iterations."""
    from fastdd.distill import Distiller, build_config
    dataset, channels, size, ipc = spec
    per_class = 500 if dataset != "random" else 12
    train, source = load_case_data(dataset, channels, size, num_classes, max(per_class, batch_real + 4),
                                   make_on=device if torch.device(device).type == "cuda" else None)
    overrides = [f"ipc={ipc}", f"batch_real={batch_real}", "progress=false", f"device={device}"]
    cfg = build_config(overrides=overrides + ([f"model={model}"] if model != "ConvNet" else []))
    engine = Distiller(cfg, train)
    engine.method.prepare(engine)
    reference = ReferenceLoop(train, engine.syn.images, ipc, batch_real, device, model=model)
    counter = iter(range(10**9))
    steps = {"reference loop": reference.step, "fastdd": lambda: engine.method.iteration(engine, next(counter))}
    configs = {"fastdd": cfg}
    for method in CASE_METHODS.get(name, ()):
        mcfg = build_config({"method": method, "method_args": METHOD_ARGS[method]},
                            overrides=overrides + ([f"model={model}"] if model != "ConvNet" else []))
        other = Distiller(mcfg, train)
        other.method.prepare(other)
        steps[f"fastdd {method}"] = (lambda e: lambda: e.method.iteration(e, next(counter)))(other)
        configs[f"fastdd {method}"] = mcfg
    for _ in range(warmup):
        for step in steps.values():
            _timed(step, device)
    load_before = os.getloadavg()
    samples = {provider: [] for provider in steps}
    memory = {provider: [] for provider in steps}
    for i in range(iterations):  # A B A B: machine noise falls on both
        if time_left is not None and i >= 2 and time_left() <= 0:
            break
        for provider, step in steps.items():
            seconds, extra = _timed(step, device)
            samples[provider].append(seconds)
            memory[provider].append(extra)
    load_after = os.getloadavg()
    profiles = {provider: profile_table(step) for provider, step in steps.items()} if profile else {}
    flops = step_flops(channels, size, ipc, batch_real, num_classes, model)
    reference_median = statistics.median(samples["reference loop"])
    dm_median = statistics.median(samples["fastdd"])
    rows = []
    for provider, times in samples.items():
        median = statistics.median(times)
        rows.append(dict(
            case=name, data=source, shape=f"{channels}x{size}x{size}", ipc=ipc, batch_real=batch_real,
            classes=num_classes, model=model, provider=provider,
            what=(f"fastdd Distiller, default config (method={configs[provider].method}, as shipped)"
                  if provider in configs else
                  "per-class loop, nn.GroupNorm/ReLU/AvgPool2d, per-class reference DSA ops, data on device"),
            config=None if provider not in configs else {k: v for k, v in vars(configs[provider]).items()
                                                         if isinstance(v, (int, float, str, bool, type(None), dict))},
            iterations=len(times), warmup=warmup, median_s=median, min_s=min(times), max_s=max(times),
            all_seconds=times, step_peak_extra_mb=max(memory[provider]) if memory[provider][0] is not None else None,
            load_avg_1min_before=load_before[0], load_avg_1min_after=load_after[0],
            conv_flops_per_iteration=flops, sgemm_peak_gflops=peak_flops / 1e9,
            flop_floor_s=flops / peak_flops, flop_floor_fraction=flops / peak_flops / median,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32 if device.startswith("cuda") else None,
            peak_memory_ratio_vs_reference=(max(memory[provider]) / max(memory["reference loop"])
                                            if memory[provider][0] is not None else None),
            speedup_vs_reference=reference_median / median, ratio_to_fastdd_dm=median / dm_median,
            profile=profiles.get(provider)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/dm_iteration.json; "
                                               "--smoke: a temp file)")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per provider (>= 20 for results)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table (top ops) to each row")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations: checks the script runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        cases, batch_real, iterations, warmup = SMOKE_CASE, SMOKE_BATCH_REAL, 2, 1
        out = args.out or os.path.join(tempfile.gettempdir(), "fastdd_dm_iteration_smoke.json")
    else:
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            raise ValueError(f"--cases: unknown case(s) {unknown}; valid: {', '.join(CASES)}")
        if args.iterations < 1 or args.warmup < 0:
            raise ValueError("--iterations must be >= 1 and --warmup >= 0")
        cases = {c: CASES[c] for c in args.cases.split(",")}
        batch_real, iterations, warmup = BATCH_REAL, args.iterations, args.warmup
        out = args.out or os.path.join(REPO, "benchmarks", "results", "dm_iteration.json")
    res = Results("dm_iteration", args.device)
    peak = sgemm_peak_flops(args.device, n=256 if args.smoke else None)
    for name, spec in cases.items():
        for row in measure_case(name, spec, args.device, iterations, warmup, batch_real, peak, profile=args.profile):
            res.add(**row)
    res.write(out)


if __name__ == "__main__":
    main()
