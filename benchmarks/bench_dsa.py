"""Benchmark: batched siamese DSA (all classes, one call) vs the reference per-class loop, same run and draw."""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

import torch  # noqa: E402

from fastdd.augment import SiameseAugment, reference_ops  # noqa: E402

CASES = [  # (shape name, (C, H, W), classes, real images per class)
    ("mnist", (1, 28, 28), 10, 256),
    ("mnist", (1, 28, 28), 100, 64),
    ("cifar", (3, 32, 32), 10, 256),
    ("cifar", (3, 32, 32), 100, 64),
]
IPC = 10
PASS = "draw + forward real + forward/backward syn (ipc 10); outputs live until the step ends"
# glibc hands tensors over 32 MiB back to the OS on free, so each fresh full-batch tensor page-faults
# again; the per-class loop's small tensors are recycled. The second setting keeps freed memory.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def malloc_setting() -> str:
    tuned = [f"{k}={os.environ[k]}" for k in KEEP_FREED_MEMORY if k in os.environ]
    return "glibc " + (" ".join(tuned) if tuned else "default")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(step, device: torch.device, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(shape, classes, real_per_class, device, warmup, repeats):
    aug = SiameseAugment()
    data_gen = torch.Generator().manual_seed(0)
    real = torch.randn(classes * real_per_class, *shape, generator=data_gen).to(device)
    syn = torch.randn(classes * IPC, *shape, generator=data_gen).to(device).requires_grad_()
    real_group = torch.arange(classes, device=device).repeat_interleave(real_per_class)
    syn_group = torch.arange(classes, device=device).repeat_interleave(IPC)
    real_by_class, syn_by_class = real.split(real_per_class), syn.split(IPC)
    draw_gen = torch.Generator().manual_seed(1)

    def batched():
        draw = aug.draw(classes, shape[1:], draw_gen, device=device)
        real_out = aug.apply(real, real_group, draw)
        aug.apply(syn, syn_group, draw).sum().backward()
        return real_out

    def per_class_loop():
        draw = aug.draw(classes, shape[1:], draw_gen, device=device)
        real_out = [reference_ops.apply_group(real_by_class[c], draw, c) for c in range(classes)]
        syn_out = [reference_ops.apply_group(syn_by_class[c], draw, c) for c in range(classes)]
        sum(out.sum() for out in syn_out).backward()
        return real_out

    return (median_seconds(batched, device, warmup, repeats),
            median_seconds(per_class_loop, device, warmup, repeats))


def run_cases(args) -> list[dict]:
    device = torch.device(args.device)
    common = {"bench": "dsa_siamese", "device": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "malloc": malloc_setting(),
              "date": datetime.date.today().isoformat(), "pass": PASS}
    rows = []
    for name, shape, classes, real_per_class in CASES:
        seconds_batched, seconds_loop = bench_case(shape, classes, real_per_class, device,
                                                   args.warmup, args.repeats)
        row = dict(common, load_avg_1min=round(os.getloadavg()[0], 2), shape=f"{name} {'x'.join(map(str, shape))}", classes=classes,
                   real_per_class=real_per_class, ipc=IPC, seconds_batched=round(seconds_batched, 6),
                   seconds_loop=round(seconds_loop, 6), ratio=round(seconds_loop / seconds_batched, 3))
        rows.append(row)
        print(f"{row['malloc']:<60} {row['shape']:>14} classes={classes:>3}  batched "
              f"{seconds_batched * 1e3:8.2f} ms  loop {seconds_loop * 1e3:8.2f} ms  loop/batched {row['ratio']:.2f}x",
              flush=True)
    return rows


def rows_with_kept_memory(args) -> list[dict]:
    """Same cases in a child process whose glibc keeps freed memory (set before the process starts)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, "--device", args.device, "--out", str(out), "--single-malloc",
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        subprocess.run(command, env={**os.environ, **KEEP_FREED_MEMORY}, check=True)
        return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dsa_<device>.json)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (the box's cores are shared)")
    parser.add_argument("--single-malloc", action="store_true", help="skip the kept-freed-memory CPU rerun")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device_type = torch.device(args.device).type
    out = Path(args.out or Path(__file__).parent / "results" / f"dsa_{device_type}.json")
    rows = run_cases(args)
    if device_type == "cpu" and not args.single_malloc and sys.platform.startswith("linux"):
        rows += rows_with_kept_memory(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
