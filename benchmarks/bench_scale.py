"""Scale benchmark: a generated ImageNet-like folder through `fastdd prepare` (images/s against a one-process decode
loop), then DM and gm iterations at ImageNet-100 shape under a memory budget (peak RSS, s/iteration) for 10/50/100
classes, chunked against one pass, and the CLI end to end; writes JSON and a PNG of peak memory against classes."""
import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "benchmarks", "results")


# ---- the generated folder ---------------------------------------------------------------------------------
def _write_class(args) -> int:
    root, c, per_class, seed = args
    from PIL import Image
    rng = np.random.default_rng(seed * 100003 + c)
    folder = os.path.join(root, f"n{c:08d}")
    os.makedirs(folder, exist_ok=True)
    base = rng.integers(0, 256, (3,))
    for i in range(per_class):
        w, h = int(rng.integers(300, 501)), int(rng.integers(240, 501))  # ImageNet's typical 500x375-ish
        grid = np.clip(base + rng.normal(0, 60, (6, 8, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"n{c:08d}_{i}.JPEG"), quality=90)
    return per_class


def generate_folder(root: str, classes: int, per_class: int, seed: int = 0, workers: int = 2) -> float:
    """root/n0000000c/*.JPEG, `per_class` smooth random images of ImageNet-like sizes per class (cached)."""
    marker = os.path.join(root, f".complete-{classes}x{per_class}-{seed}")
    if os.path.exists(marker):
        return 0.0
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, [(root, c, per_class, seed) for c in range(classes)]))
    open(marker, "w").close()
    return time.perf_counter() - t0


def files_of(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".JPEG"))


# ---- prepare throughput ---------------------------------------------------------------------------------
def bench_prepare(src: str, out: str, size: int, workers: int, baseline_images: int) -> dict:
    from fastdd.data.prepare import decode_one, prepare
    files = files_of(src)
    sample = files[:: max(1, len(files) // baseline_images)][:baseline_images]
    t0 = time.perf_counter()
    for path in sample:
        decode_one(path, size)
    loop_s = time.perf_counter() - t0
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    t0 = time.perf_counter()
    prepare(src, out, size=size, workers=workers, progress=False)
    prep_s = time.perf_counter() - t0
    return {"size": size, "images": len(files), "workers": workers, "prepare_s": prep_s,
            "prepare_images_per_s": len(files) / prep_s, "loop_images": len(sample),
            "loop_images_per_s": len(sample) / loop_s, "speedup": (len(files) / prep_s) / (len(sample) / loop_s)}


# ---- one distillation case in a child process (its own peak RSS) ------------------------------------------
def run_child(case: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(case: dict) -> dict:
    import torch
    from fastdd.data.dataset import ImageDataset
    from fastdd.data.shards import load_prepared
    from fastdd.distill import Distiller, build_config
    torch.set_num_threads(case.get("threads", os.cpu_count()))
    full = load_prepared(case["data"], split="train")
    k = case["classes"]
    n = int((full.labels < k).sum())
    if not bool((full.labels[:n] < k).all()):
        raise SystemExit("prepared shard is not class-major: a class prefix is not a view")
    train = ImageDataset(images=full.images[:n], labels=full.labels[:n], num_classes=k, mean=full.mean,
                         std=full.std, name=f"{full.name}-{k}", class_names=full.class_names[:k])
    cfg = build_config({"method": case["method"], "ipc": case["ipc"], "batch_real": case["batch_real"],
                        "memory_budget": case["budget"], "device": "cpu", "progress": False,
                        "checkpoint_every": 0, "iterations": case["iterations"] + 1, "seed": 0,
                        **case.get("keys", {})})
    engine = Distiller(cfg, train, None)
    engine.method.prepare(engine)
    engine._prepared = True
    plans = []
    real_plan = engine.chunk_plan
    engine.chunk_plan = lambda *a, **kw: plans.append(real_plan(*a, **kw).num_chunks) or real_plan(*a, **kw)
    times = []
    for it in range(case["iterations"] + 1):
        t0 = time.perf_counter()
        logs = engine.run_iteration(it)
        loss = float(logs["loss"])
        times.append(time.perf_counter() - t0)
    timed = times[1:]
    return {**case, "model": engine.config.model, "s_per_iteration_median": float(np.median(timed)),
            "s_per_iteration_min": min(timed), "s_per_iteration_max": max(timed), "warmup_s": times[0],
            "s_per_iteration_samples": timed,
            "chunks": max(plans) if plans else None, "peak_rss_mb": _peak_rss_mb(), "final_loss": loss,
            "real_rows_per_iteration": k * case["batch_real"]}


# ---- the CLI end to end -----------------------------------------------------------------------------------
def run_cli(args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fastdd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    return {"command": "fastdd " + " ".join(args), "exit_code": os.waitstatus_to_exitcode(status),
            "wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stderr_tail": err.strip().splitlines()[-1] if err.strip() else ""}


def plot(rows: list[dict], path: str, budget_mb: float, flat_budget_mb: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["method"], r["size"], r["ipc"], r["budget"]) for r in rows if "peak_rss_mb" in r})
    for method, size, ipc, budget in keys:
        sel = sorted((r["classes"], r["peak_rss_mb"]) for r in rows
                     if (r["method"], r["size"], r["ipc"], r["budget"]) == (method, size, ipc, budget)
                     and "peak_rss_mb" in r)
        ax.plot(*zip(*sel), marker="o", label=f"{method} {size}px ipc{ipc} budget {budget}")
    ax.axhline(budget_mb, color="grey", linestyle="--", label="memory_budget (large)")
    ax.axhline(flat_budget_mb, color="grey", linestyle=":", label="memory_budget (small)")
    ax.set_xlabel("classes")
    ax.set_ylabel("peak process RSS (MiB)")
    ax.set_title("fastdd peak memory against the number of classes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastdd-scale-folder"))
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastdd-scale-prepared"))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--class-counts", default="10,50,100", help="dm at the first size")
    p.add_argument("--class-counts-large", default="10,100", help="dm at the other sizes (128 px: ~100 s/it)")
    p.add_argument("--gm-class-counts", default="10", help="gm at the first size (~65 s/it at 10 classes here)")
    p.add_argument("--budget", default="8GB")
    p.add_argument("--flat-budget", default="1GB", help="dm sweep over classes under a budget that forces chunks")
    p.add_argument("--batch-real", type=int, default=32)
    p.add_argument("--iterations", type=int, default=2, help="timed dm iterations after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the chunked vs one-pass pair")
    p.add_argument("--chunk-budget", default="600MB", help="budget that splits the pair's classes into chunks")
    p.add_argument("--pair-methods", default="dm")
    p.add_argument("--baseline-images", type=int, default=1500)
    p.add_argument("--smoke", action="store_true", help="tiny folder and cases (checks the script runs)")
    p.add_argument("--out", default=os.path.join(RESULTS, "scale_cpu.json"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.smoke:
        a.classes, a.per_class, a.sizes, a.class_counts, a.class_counts_large = 4, 6, "32,16", "2,4", "4"
        a.gm_class_counts, a.batch_real, a.iterations, a.baseline_images = "2", 4, 1, 8
        a.budget, a.flat_budget, a.chunk_budget = "256MB", "64MB", "64MB"
        a.folder, a.work = a.folder + "-smoke", a.work + "-smoke"
    import torch
    ipc = 2 if a.smoke else 10
    gm_keys = {"inner_loop": 2, "n_data": 4 * a.batch_real, "factor": 2}
    gm_cli_keys = {"inner_loop": 1, "n_data": 2 * a.batch_real, "factor": 1}  # gm at 100 classes: ~10 min/it
    report = {"benchmark": "scale (ImageNet-like generated folder)", "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
              "budget": a.budget, "batch_real": a.batch_real, "gm_keys": gm_keys, "gm_cli_keys": gm_cli_keys,
              "folder": {"classes": a.classes, "per_class": a.per_class, "sizes_px": "300-500 x 240-500 JPEG q90"}}

    def save():
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    report["folder"]["generate_s"] = generate_folder(a.folder, a.classes, a.per_class)
    sizes = [int(s) for s in a.sizes.split(",")]
    report["prepare"] = []
    for size in sizes:
        report["prepare"].append(bench_prepare(a.folder, f"{a.work}-{size}", size, os.cpu_count(), a.baseline_images))
        print(report["prepare"][-1], flush=True)
        save()

    def counts(text):
        return [int(c) for c in text.split(",")]
    cases = []  # (size, method, classes, ipc, budget, timed iterations, method keys)
    for classes in counts(a.class_counts):
        cases.append((sizes[0], "dm", classes, ipc, a.budget, a.iterations, {}))
    cases.append((sizes[0], "dm", a.classes, 5 * ipc, a.budget, a.iterations, {}))
    cases += [(sizes[0], "gm", c, ipc, a.budget, 1, gm_keys) for c in counts(a.gm_class_counts)]
    cases += [(size, "dm", c, ipc, a.budget, 1, {}) for size in sizes[1:] for c in counts(a.class_counts_large)]
    cases += [(sizes[0], "dm", c, ipc, a.flat_budget, 1, {}) for c in counts(a.class_counts)]
    report["cases"] = []
    for size, method, classes, case_ipc, budget, iterations, keys in cases:
        report["cases"].append(run_child({"data": f"{a.work}-{size}", "size": size, "method": method,
                                          "classes": classes, "ipc": case_ipc, "batch_real": a.batch_real,
                                          "budget": budget, "iterations": iterations, "keys": keys}))
        print(report["cases"][-1], flush=True)
        save()
    small = min(counts(a.class_counts))
    report["chunked_vs_one_pass"] = []
    for method in a.pair_methods.split(","):  # interleaved A B A B, each child one warm-up then timed iterations
        keys = {**gm_keys, "class_chunk": small} if method == "gm" else {}  # gm: no CPU cache-size cap
        runs = {"one_pass": [], "chunked": []}
        for _ in range(a.rounds):
            for label, budget in (("one_pass", "64GB"), ("chunked", a.chunk_budget)):
                runs[label].append(run_child({"data": f"{a.work}-{sizes[0]}", "size": sizes[0], "method": method,
                                              "classes": small, "ipc": ipc, "batch_real": a.batch_real,
                                              "budget": budget, "iterations": 2, "keys": keys}))
        entry = {"method": method, "classes": small, "runs": runs}
        try:
            med = {k: float(np.median([t for r in v for t in r["s_per_iteration_samples"]])) for k, v in runs.items()}
            entry.update({"one_pass_s": med["one_pass"], "chunked_s": med["chunked"],
                          "chunks": [r["chunks"] for r in runs["chunked"]],
                          "time_ratio": med["chunked"] / med["one_pass"]})
        except KeyError:
            entry["error"] = "a run failed (see runs)"
        report["chunked_vs_one_pass"].append(entry)
        print({k: v for k, v in entry.items() if k != "runs"}, flush=True)
        save()
    report["cli"] = []
    for method, keys, batch in (("dm", {}, a.batch_real), ("gm", gm_cli_keys, a.batch_real // 2)):
        args = ["distill", "--dataset", "prepared", "--data-dir", f"{a.work}-{sizes[0]}", "--method", method,
                "--iterations", "1", "--ipc", str(ipc), "--device", "cpu",
                "--out", os.path.join(a.work + "-runs", method), f"memory_budget={a.budget}", f"batch_real={batch}",
                "eval_num_models=1", "eval_epochs=1", "progress=false", *(f"{k}={v}" for k, v in keys.items())]
        report["cli"].append(run_cli(args))
        print(report["cli"][-1], flush=True)
        save()
    report["load_after"] = os.getloadavg()
    save()
    from fastdd.distill.memory import parse_budget
    plot(report["cases"], os.path.splitext(a.out)[0] + ".png", parse_budget(a.budget) / 2**20,
         parse_budget(a.flat_budget) / 2**20)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
