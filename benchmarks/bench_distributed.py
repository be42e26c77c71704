"""Class-parallel distillation benchmark: 1 vs N torchrun ranks, s/iteration, scaling efficiency, bytes communicated."""
import argparse
import datetime
import functools
import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # run from a checkout, no install needed
DEFAULT_OUT = os.path.join(HERE, "results", "distributed_{device}.json")

# name -> (classes, side, model, real images per class); random uint8 pixels of these shapes
CASES = {"cifar100": (100, 32, "ConvNet", 50), "imagenet100-64": (100, 64, "auto", 50)}
SMOKE_CASES = {"smoke": (4, 8, "ConvNet", 12)}
BASE = ["progress=false", "checkpoint_every=0", "eval_every=0", "ipc=10", "batch_real=16", "seed=0"]
METHODS = {"dm": ["method=dm"],
           # inner_loop 2: two matching steps and one (replicated) network-training pass per iteration. factor 1
           # and batch_real 8: IDC's factor 2 / 16 real took ~235 s per 1-thread iteration at CIFAR-100 shape here
           "gm": ["method=gm", "inner_loop=2", "n_data=128", "net_batch=64", "factor=1", "batch_real=8"]}
SMOKE_OVERRIDES = {"dm": ["ipc=2", "batch_real=4"], "gm": ["ipc=2", "batch_real=4", "n_data=16", "net_batch=8"]}
# the argument of each collective whose tensors are the payload (bytes = their nbytes summed)
PAYLOAD = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_gather": "tensor_list",
           "all_gather_into_tensor": "output_tensor", "reduce_scatter": "input_list",
           "reduce_scatter_tensor": "input", "gather": "tensor", "scatter": "tensor",
           "all_to_all": "input_tensor_list", "all_to_all_single": "input", "send": "tensor", "recv": "tensor",
           "isend": "tensor", "irecv": "tensor", "barrier": None}
BYTES_DEFINITION = ("per rank, the nbytes of each collective's payload argument: all_reduce/broadcast/reduce/send: "
                    "the tensor; all_gather: the gathered output list (world x input); *_object collectives count "
                    "as the tensor collectives they run (pickled bytes, padded, plus size tensors)")
TWENTY_RULE = ("not met: {n} timed iterations per row (issue asks >= 20) to keep the default run within ~6 "
               "minutes on a 2-core machine for 2 methods x 2 shapes x 3 layouts at 100 classes, ipc 10; "
               "raise --iterations on a larger machine")


def payload_bytes(name: str, fn, args, kwargs) -> int:
    """Bytes of the payload argument of collective `name` called as fn(*args, **kwargs)."""
    key = PAYLOAD[name]
    if key is None:
        return 0
    value = inspect.signature(fn).bind_partial(*args, **kwargs).arguments.get(key)
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return sum(t.nbytes for t in tensors if torch.is_tensor(t))


class CollectiveCounter:
    """Wraps torch.distributed's collectives (both namespaces, so the *_object helpers' inner calls count) and
    adds calls and payload bytes to the current phase; `original` keeps the unwrapped ones."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        self.phase = None  # None: not counting
        self.counts: dict = {}
        self.original = {}
        for name in PAYLOAD:
            fn = getattr(c10d, name, None)
            if fn is None:
                continue
            self.original[name] = fn
            wrapped = self._wrap(name, fn)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.phase is not None:
                entry = self.counts.setdefault(self.phase, {}).setdefault(name, {"calls": 0, "bytes": 0})
                entry["calls"] += 1
                entry["bytes"] += payload_bytes(name, fn, args, kwargs)
            return fn(*args, **kwargs)
        return counted

    def total(self, phase: str) -> int:
        return sum(e["bytes"] for e in self.counts.get(phase, {}).values())


def random_dataset(classes: int, side: int, per_class: int):
    """Random uint8 images (same on every rank: a seeded generator), labels class-major."""
    from fastdd.data import from_tensors
    g = torch.Generator().manual_seed(0)
    n = classes * per_class
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return from_tensors(images, torch.arange(n) // per_class, name=f"random-{classes}x{side}", num_classes=classes,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def run_job(job: dict, counter: CollectiveCounter, device: str) -> dict:
    """One (case, method) on this rank: setup, warm-up, timed iterations (each timed on its own), loss read,
    final gather; -> per-rank seconds and counted bytes per phase."""
    import torch.distributed as dist
    from fastdd.distill import Distiller, build_config
    classes, side, model, per_class = job["case"]
    train = random_dataset(classes, side, per_class)
    config = build_config(overrides=[*BASE, *job["overrides"], f"model={model}", f"device={device}",
                                     f"iterations={job['warmup'] + job['iterations']}"])
    counter.phase = "setup"
    engine = Distiller(config, train)
    engine.method.prepare(engine)
    engine._prepared = True
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    distributed = engine.shard is not None
    barrier = (lambda: counter.original["barrier"]()) if distributed else (lambda: None)

    def iterate():
        logs = engine.run_iteration(engine.iteration)
        engine.iteration += 1
        loss = logs.get("loss", float("nan"))
        engine.history["loss"].append(loss.detach() if torch.is_tensor(loss) else float(loss))

    counter.phase = "warm-up"
    for _ in range(job["warmup"]):
        iterate()
    engine.read_losses()
    sync()
    counter.phase = None
    barrier()
    counter.phase = "iterations"
    seconds = []
    loop_start = time.perf_counter()
    for _ in range(job["iterations"]):
        start = time.perf_counter()
        iterate()
        sync()
        seconds.append(time.perf_counter() - start)
    counter.phase = None
    barrier()
    loop_wall = time.perf_counter() - loop_start
    for phase, step in (("loss read", engine.read_losses), ("final gather", engine.sync_synthetic)):
        counter.phase = phase
        step()
    counter.phase = None
    mine = {"seconds": seconds, "loop_wall_s": loop_wall, "counts": counter.counts,
            "bytes": {p: counter.total(p) for p in counter.counts}, "classes": len(engine.shard.classes)
            if distributed else classes, "model": engine.config.model}
    counter.counts = {}
    if not distributed:
        return {"ranks": [mine]}
    gathered = [None] * engine.shard.world_size
    dist.all_gather_object(gathered, mine)  # phase None: not counted
    return {"ranks": gathered}


def worker(spec_path: str) -> None:
    """One rank (under torchrun, or alone): every job of the spec; rank 0 writes the results."""
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    counter = CollectiveCounter()
    results = {}
    for job in spec["jobs"]:
        try:
            results[job["name"]] = run_job(job, counter, spec["device"])
        except (ValueError, RuntimeError) as error:
            results[job["name"]] = {"error": f"{type(error).__name__}: {error}"}
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{job['name']}: {json.dumps(results[job['name']])[:200]}", file=sys.stderr, flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(spec["result"], "w") as f:
            json.dump(results, f)
    from fastdd.distill import distributed
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: str, layout: dict, jobs: list, device: str, timeout: float) -> dict:
    """torchrun with layout's ranks running this script's --worker on `jobs`; -> rank 0's results."""
    tag = f"{layout['ranks']}r{layout['threads']}t"
    spec = os.path.join(tmp, f"{tag}.json")
    result = os.path.join(tmp, f"{tag}-result.json")
    with open(spec, "w") as f:
        json.dump({"jobs": jobs, "threads": layout["threads"], "device": device, "result": result}, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(layout["threads"]),
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(layout["ranks"]),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), os.path.abspath(__file__),
           "--worker", spec]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not os.path.exists(result):
        rank_lines = "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank"))
        raise RuntimeError(f"{tag} launch failed (exit {done.returncode}): {(rank_lines or done.stderr)[-3000:]}")
    with open(result) as f:
        return json.load(f)


def row_from(result: dict, layout: dict, case: str, method: str, device: str, load_before, load_after) -> dict:
    """One JSON row: s/iteration over ranks (median/min/max of each iteration's slowest rank), bytes per phase."""
    row = {"device": device, "case": case, "method": method, "ranks": layout["ranks"],
           "threads_per_rank": layout["threads"], "loadavg_before": load_before, "loadavg_after": load_after}
    if "error" in result:
        return {**row, "error": result["error"]}
    ranks = result["ranks"]
    per_iteration = [max(r["seconds"][i] for r in ranks) for i in range(len(ranks[0]["seconds"]))]
    n = len(per_iteration)
    rank0 = ranks[0]["bytes"]
    per_run = {p: b for p, b in rank0.items() if p in ("setup", "final gather")}
    return {**row, "model": ranks[0]["model"], "classes_per_rank": [r["classes"] for r in ranks],
            "median_s": statistics.median(per_iteration), "min_s": min(per_iteration), "max_s": max(per_iteration),
            "loop_wall_s_per_iteration": max(r["loop_wall_s"] for r in ranks) / n, "timed_iterations": n,
            # in-iteration collectives plus the loss all-reduce a run does every 25 iterations, per iteration
            "comm_bytes_per_iteration": (rank0.get("iterations", 0) + rank0.get("loss read", 0)) / n,
            "comm_bytes_in_iterations": rank0.get("iterations", 0), "comm_bytes_loss_read": rank0.get("loss read", 0),
            "comm_bytes_per_run": per_run, "collectives_by_phase_rank0": ranks[0]["counts"]}


def scaling(rows: list) -> list:
    """Per (case, method): efficiency t1 / (N t_N) against 1 rank 1 thread, speedup against 1 rank with N threads."""
    out = []
    timed = [r for r in rows if "median_s" in r]
    for r in timed:
        if r["ranks"] == 1:
            continue
        same = [b for b in timed if (b["case"], b["method"], b["ranks"]) == (r["case"], r["method"], 1)]
        one = next((b for b in same if b["threads_per_rank"] == 1), None)
        threaded = next((b for b in same if b["threads_per_rank"] == r["ranks"]), None)
        entry = {"device": r["device"], "case": r["case"], "method": r["method"], "ranks": r["ranks"]}
        if one:
            entry["efficiency"] = one["median_s"] / (r["ranks"] * r["median_s"])
        if threaded:
            entry[f"speedup_vs_1_rank_{r['ranks']}_threads"] = threaded["median_s"] / r["median_s"]
        out.append(entry)
    return out


def layouts_for(device: str) -> list:
    if device == "cpu":
        return [{"ranks": 1, "threads": 1}, {"ranks": 1, "threads": 2}, {"ranks": 2, "threads": 1}]
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device on this machine")
    return [{"ranks": n, "threads": 1} for n in sorted({1, *range(2, torch.cuda.device_count() + 1)})]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NCCL, one GPU per rank")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per row (after the warm-up)")
    p.add_argument("--methods", default="dm,gm")
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)} (ignored with --smoke)")
    p.add_argument("--smoke", action="store_true", help="4 classes, 8 px, 1 timed iteration")
    p.add_argument("--out", default=None)
    p.add_argument("--timeout-s", type=float, default=7200, help="per launch (all jobs of one layout)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    names = [c for c in args.cases.split(",") if c]
    if not args.smoke and (not names or set(names) - set(CASES)):
        raise ValueError(f"--cases: unknown case(s) {sorted(set(names) - set(CASES))}; choose from {sorted(CASES)}")
    layouts = layouts_for(args.device)
    cases = SMOKE_CASES if args.smoke else {c: CASES[c] for c in names}
    iterations = 1 if args.smoke else args.iterations
    warmup = 0 if args.smoke else args.warmup
    extra = SMOKE_OVERRIDES if args.smoke else {}
    jobs = [{"name": f"{case}/{m}", "case": shape, "overrides": [*METHODS[m], *extra.get(m, [])], "warmup": warmup,
             "iterations": iterations} for case, shape in cases.items() for m in methods]
    out = args.out or DEFAULT_OUT.format(device=args.device + ("_smoke" if args.smoke else ""))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device, "smoke": args.smoke,
              "settings": {"cases": {c: dict(zip(("classes", "side", "model", "real_per_class"), s))
                                     for c, s in cases.items()},
                           "base": BASE, "methods": {m: METHODS[m] + extra.get(m, []) for m in methods}, "warmup": warmup,
                           "timed_iterations": iterations, "layouts": layouts,
                           "backend": "gloo" if args.device == "cpu" else "nccl",
                           "launch": "python -m torch.distributed.run --nproc-per-node N --master-addr 127.0.0.1",
                           "bytes": BYTES_DEFINITION},
              "twenty_iteration_rule": "met" if iterations >= 20 else TWENTY_RULE.format(n=iterations),
              "loadavg_start": list(os.getloadavg()), "rows": [], "scaling": []}
    import tempfile
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            before = list(os.getloadavg())
            results = launch(tmp, layout, jobs, args.device, args.timeout_s)
            after = list(os.getloadavg())
            for job in jobs:
                case, method = job["name"].split("/")
                report["rows"].append(row_from(results[job["name"]], layout, case, method, args.device, before, after))
            report["scaling"] = scaling(report["rows"])
            report["loadavg_end"] = list(os.getloadavg())
            report["runtime_s"] = time.perf_counter() - started
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    for r in report["rows"]:
        print(f"{r['case']:>15} {r['method']} ranks={r['ranks']} threads={r['threads_per_rank']}: "
              + (f"{r['median_s']:.3f} s/it, {r['comm_bytes_per_iteration']:.0f} B/it" if "median_s" in r
                 else r["error"]))
    for s in report["scaling"]:
        print(s)
    return report


if __name__ == "__main__":
    main()
