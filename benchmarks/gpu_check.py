"""One-shot GPU check: ops vs fp64 references, opcheck/compile, determinism, CUDA-vs-CPU iterations, host syncs, speed; one JSON."""
import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dm_iteration as dm_bench  # noqa: E402
from harness import Results, bandwidth_floor_gbps, sgemm_peak_flops, time_device  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class Check:
    """Runs sections in order, each in try/except; perf sections are skipped once the deadline has passed.
    The JSON is rewritten after every section, so a run cut short still leaves what it measured."""

    def __init__(self, device: str, smoke: bool, budget_s: float, out: str):
        self.device, self.smoke, self.out = device, smoke, out
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        meta = Results("gpu_check", device).meta
        self.report = {"meta": {**meta, "smoke": smoke, "budget_s": budget_s, "python": sys.version.split()[0],
                                "triton": _triton_version()},
                       "sections": {}, "correctness": [], "opcheck": [], "compile": [], "determinism": [],
                       "iterations": [], "host_syncs": [], "perf_ops": [], "perf_dm": [], "memory": {}}

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def section(self, name: str, fn, perf: bool = False) -> None:
        t0 = time.perf_counter()
        if perf and self.left_s() <= 0:
            self.report["sections"][name] = {"status": "skipped: time budget spent", "seconds": 0.0}
        else:
            try:
                fn(self)
                status = {"status": "ok"}
            except Exception as error:  # one failing section must not stop the others
                status = {"status": "error", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-4000:]}
            self.report["sections"][name] = {**status, "seconds": time.perf_counter() - t0}
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()  # the next section starts from a clean allocator
        print(f"[{time.perf_counter() - self.start:7.1f}s] {name}: {self.report['sections'][name]['status']}",
              flush=True)
        self.write()

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(self.report, f, indent=1, default=str)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- op cases ---------------------------------------------------------------------------------------
OPS = ("segment_mean", "mean_match", "norm_act_pool", "spectral_surgery", "kmeans_assign", "cvar")
FUSED_KERNELS = ("segment_mean", "mean_match", "norm_act_pool", "agreement_mask", "kmeans_assign")
SHAPES = {
    "segment_mean": {"tiny": (50, 12, 5), "small": (4096, 256, 10), "large": (65536, 2048, 100)},  # N, D, S
    "mean_match": {"tiny": (40, 9, 6, 4, 4), "small": (2560, 100, 2048, 10, 10),  # Nr, Ns, D, S, syn segments
                   "large": (25600, 500, 2048, 100, 10)},
    "norm_act_pool": {"tiny": (3, 4, 6, 6), "small": (256, 128, 32, 32), "large": (32, 128, 128, 128)},
    "spectral_surgery": {"tiny": (3, 4, 2, 8, 8), "small": (4, 100, 3, 32, 32), "large": (4, 500, 3, 64, 64)},
    "kmeans_assign": {"tiny": (40, 6, 3, 4, True), "small": (4096, 512, 1, 64, False),  # N, D, S, k, per-segment
                      "large": (25600, 2048, 10, 10, True)},
    "cvar": {"tiny": (5, 7), "small": (1000, 64), "large": (100000, 64)},
}


def _spec(op: str, size: str, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """fast (public op) and ref (fp64 oracle) callables returning tuples, their args, differentiable arg indices."""
    from fastdd import ops
    from fastdd.reference import cvar as rc, kmeans_assign as rk, mean_match as rm, norm_act_pool as rn
    from fastdd.reference import segment_mean as rs, spectral_surgery as rss
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they are used: large shapes stay quick

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, device=device).to(dtype)

    def ids(high, n):
        return torch.randint(0, high, (n,), generator=g, device=device)
    dims = SHAPES[op][size]
    if op == "segment_mean":
        n, d, s = dims
        return dict(fast=lambda *a: (ops.segment_mean(*a),), ref=lambda *a: (rs.segment_mean(*a),),
                    args=[randn(n, d), ids(s, n), s], diff=[0], names=["out", "grad_x"])
    if op == "mean_match":
        nr, ns, d, s, s_syn = dims
        real_to_syn = torch.arange(s, device=device) % s_syn if s_syn < s else None
        return dict(fast=lambda *a: (ops.mean_match(*a),), ref=lambda *a: (rm.mean_match(*a)[0],),
                    args=[randn(nr, d), ids(s, nr), randn(ns, d), ids(s_syn, ns), s, real_to_syn], diff=[0, 2],
                    names=["loss", "grad_real", "grad_syn"])
    if op == "norm_act_pool":
        n, c, h, w = dims
        # Each plane is ±v with |v| >= 0.25 (mean exactly 0) and |bias/weight| <= 0.1: no value sits near the
        # ReLU kink, so fp32 and fp64 take the same branch and gradients compare without flips.
        v = 0.25 + torch.randn(n, c, h * w // 2, generator=g, dtype=torch.float64, device=device).abs()
        planes = torch.cat([v, -v], 2)
        order = torch.argsort(torch.rand(planes.shape, generator=g, device=device), 2)
        x = planes.gather(2, order).view(n, c, h, w).to(dtype)
        if size == "small":
            x = x.contiguous(memory_format=torch.channels_last)
        weight = 0.5 + torch.rand(c, generator=g, dtype=torch.float64, device=device)
        bias = weight * (torch.rand(c, generator=g, dtype=torch.float64, device=device) - 0.5) * 0.2
        return dict(fast=lambda *a: (ops.norm_act_pool(*a),), ref=lambda *a: (rn.norm_act_pool(*a)[0],),
                    args=[x, weight.to(dtype), bias.to(dtype), 1e-5, 2], diff=[0, 1, 2],
                    names=["out", "grad_x", "grad_weight", "grad_bias"])
    if op == "spectral_surgery":
        gamma = None if dtype == torch.float64 else 2.0  # a hard mask flips on rounding at a(k) ≈ tau
        return dict(fast=lambda *a: ops.spectral_surgery(*a), ref=lambda *a: rss.spectral_surgery(*a),
                    args=[randn(*dims), 0.5, gamma, 1e-12, True], diff=[], names=["shared", "specific", "agreement"])
    if op == "kmeans_assign":
        n, d, s, k, per_segment = dims
        centroids = randn(s, k, d) if per_segment else randn(s * k, d)
        return dict(fast=lambda *a: ops.kmeans_assign(*a), ref=lambda *a: rk.kmeans_assign(*a)[::-1],
                    args=[randn(n, d), centroids, ids(s, n) if per_segment else None], diff=[0],
                    names=["labels", "sqdist", "grad_x"])
    if op == "cvar":
        return dict(fast=lambda *a: (ops.cvar(*a),), ref=lambda *a: (rc.cvar_bruteforce(*a),),
                    args=[randn(*dims), 0.3], diff=[0], names=["cvar", "grad_losses"])
    raise ValueError(f"unknown op {op!r}")


def _cotangent(like: torch.Tensor, seed: int, round_to: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device=like.device).manual_seed(seed)
    values = torch.randn(like.shape, generator=g, dtype=torch.float64, device=like.device)
    return values.to(round_to).to(like.dtype)


def _outputs(fn, args, diff, seed, cotangent_dtype, as_fp64=False) -> list:
    """Outputs of fn, then the gradients of the differentiable args for seeded cotangents (rounded to
    `cotangent_dtype`, so the fp64 oracle sees the same values)."""
    prepared = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(torch.float64) if as_fp64 else a.detach().clone()
            a.requires_grad_(i in diff)
        prepared.append(a)
    outs = list(fn(*prepared))
    if not diff:
        return [o.detach() for o in outs]
    floating = [o for o in outs if o.is_floating_point()]
    cotangents = [_cotangent(o, seed + 1 + i, cotangent_dtype) for i, o in enumerate(floating)]
    grads = torch.autograd.grad(floating, [prepared[i] for i in diff], cotangents)
    return [o.detach() for o in outs] + list(grads)


def max_normwise_err(a, b) -> float:
    """max over outputs of max|a − b| / max|b| (b the reference); inf where a is not finite."""
    worst = 0.0
    for x, y in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        if x.shape != y.shape or not torch.isfinite(x).all():
            return float("inf")
        if x.numel():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


def compare_with_fp64(op: str, size: str, dtype: torch.dtype, device) -> dict:
    spec = _spec(op, size, dtype, device)
    if op == "kmeans_assign":
        return _compare_kmeans(spec, dtype)
    fast = _outputs(spec["fast"], spec["args"], spec["diff"], 0, dtype)
    ref = _outputs(spec["ref"], spec["args"], spec["diff"], 0, dtype, as_fp64=True)
    return {f"{name}_err": max_normwise_err(f, r) for name, f, r in zip(spec["names"], fast, ref)}


def _compare_kmeans(spec, dtype) -> dict:
    """Labels may differ on near-ties (fp32 search): check the chosen centroid's fp64 distance is the
    minimum up to rounding, that sqdist is that distance, and the gradient 2·g·(x − c_label)."""
    x, centroids, seg = spec["args"]
    labels, sqdist, grad_x = _outputs(spec["fast"], spec["args"], [0], 0, dtype)
    x64, c64 = x.double(), centroids.double()
    flat = c64.reshape(-1, c64.shape[-1])
    all_d2 = (x64.square().sum(1, keepdim=True) - 2 * x64 @ flat.T + flat.square().sum(1)).clamp_min(0)
    if seg is not None:
        k = c64.shape[1]
        all_d2 = all_d2.view(len(x), -1, k)[torch.arange(len(x), device=x.device), seg]
        chosen_c = c64[seg, labels]
    else:
        chosen_c = flat[labels]
    exact = (x64 - chosen_c).square().sum(1)
    cotangent = _cotangent(sqdist, 1, dtype).double()
    scale = float(all_d2.min(1).values.abs().max().clamp_min(1e-30))
    return {"sqdist_err": max_normwise_err(sqdist, exact),
            "optimality_err": float((exact - all_d2.min(1).values).max()) / scale,
            "grad_x_err": max_normwise_err(grad_x, 2 * cotangent[:, None] * (x64 - chosen_c)),
            "label_mismatches": int((labels != all_d2.argmin(1)).sum())}


def correctness_grid(smoke: bool, dtypes):
    for op in OPS:
        for size in (("tiny",) if smoke else ("small", "large")):
            for dtype in dtypes:
                yield op, size, dtype


def public_call(op: str, size: str, dtype: torch.dtype, device):
    spec = _spec(op, size, dtype, device)
    return spec["fast"], spec["args"]


def forward_and_grads(op: str, size: str, dtype: torch.dtype, device, seed: int) -> list:
    spec = _spec(op, size, dtype, device, seed)
    return _outputs(spec["fast"], spec["args"], spec["diff"], seed, dtype)


class _CaptureFastddOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdd":
            copied = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                      and a.is_floating_point() else a for a in args]
            self.calls.append((func._schema.name, func, copied))
        return func(*args, **(kwargs or {}))


def captured_custom_op_calls(op: str, device) -> list:
    """(name, OpOverload, args) of every fastdd custom op the public op calls, forward and backward."""
    spec = _spec(op, "tiny", torch.float32, device)
    with _CaptureFastddOps() as capture:
        _outputs(spec["fast"], spec["args"], spec["diff"], 0, torch.float32)
    seen, calls = set(), []
    for name, func, args in capture.calls:
        if name not in seen:
            seen.add(name)
            calls.append((name, func, args))
    return calls


def kernel_and_reference(op: str, size: str, device):
    """(fastdd op, eager reference, fp32 args, minimal bytes moved by one forward call)."""
    from fastdd.reference import spectral_surgery as rss
    if op == "agreement_mask":
        grads = _spec("spectral_surgery", size, torch.float32, device)["args"][0]
        spectra = torch.view_as_real(torch.fft.rfft2(grads))
        args = [spectra, 0.5, None, 1e-12, False]
        return torch.ops.fastdd.agreement_mask, rss.agreement_mask, args, spectra.nbytes * (1 + 1 / grads.shape[0])
    spec = _spec(op, size, torch.float32, device)
    args = spec["args"]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    with torch.no_grad():
        outs = [o for o in spec["fast"](*args) if isinstance(o, torch.Tensor)]
    nbytes = sum(t.nbytes for t in tensors) + sum(o.nbytes for o in outs)
    return spec["fast"], spec["ref"], args, nbytes


# ---- engines -----------------------------------------------------------------------------------------
def small_engine(method: str, device, smoke: bool):
    from fastdd.data import from_tensors
    from fastdd.distill import Distiller, build_config
    size = 12 if smoke else 32
    g = torch.Generator().manual_seed(0)
    if method == "sgs":
        from fastdd.data.domains import rotated_mnist
        from fastdd.distill.methods.sgs_data import domain_generalization_data
        images = torch.randint(0, 256, (360, 1, size, size), dtype=torch.uint8, generator=g)
        source = from_tensors(images, torch.arange(360) % 3, num_classes=3, mean=(0.5,), std=(0.3,))
        train, test, evaluators = domain_generalization_data(rotated_mnist(source, angles=(0, 30, 60, 90)), 90)
    else:
        images = torch.randint(0, 256, (400, 3, size, size), dtype=torch.uint8, generator=g)
        train, test, evaluators = from_tensors(images, torch.arange(400) % 10, num_classes=10), None, ()
    overrides = ["progress=false", f"device={device}", f"method={method}", "ipc=2", "batch_real=16"]
    overrides += ["model=ConvNetW32"] if smoke else []
    engine = Distiller(build_config(overrides=overrides), train, test, evaluators=evaluators)
    engine.method.prepare(engine)
    return engine


def one_iteration_update(method: str, device, smoke: bool) -> torch.Tensor:
    engine = small_engine(method, device, smoke)
    before = engine.syn.images.detach().clone()
    engine.method.iteration(engine, 0)
    return engine.syn.images.detach() - before


_PEAK = {}


def dm_perf_cases(smoke: bool) -> list:
    if smoke:
        return [("smoke", ("random", 3, 16, 2), 10, "ConvNet", 4)]
    return [("cifar10-ipc10", ("cifar10", 3, 32, 10), 10, "ConvNet", 256),
            ("cifar10-ipc50", ("cifar10", 3, 32, 50), 10, "ConvNet", 256),
            ("imagenet100-128px-ipc10", ("imagenet100", 3, 128, 10), 100, "ConvNetD5", 256)]


def time_dm_case(case, device, smoke: bool, time_left) -> list:
    name, spec, classes, model, batch_real = case
    if device not in _PEAK:
        _PEAK[device] = sgemm_peak_flops(device, n=256 if smoke else None)
    return dm_bench.measure_case(name, spec, device, 2 if smoke else 10, 1 if smoke else 2, batch_real,
                                 _PEAK[device], num_classes=classes, model=model, time_left=time_left)

# ---- correctness, opcheck, compile, determinism -----------------------------------------------------
def section_correctness(check: Check) -> None:
    for op, size, dtype in correctness_grid(check.smoke, DTYPES):
        row = {"op": op, "size": size, "dtype": str(dtype).replace("torch.", ""), "tolerance": TOLERANCE[dtype]}
        try:
            errors = compare_with_fp64(op, size, dtype, check.device)
            row.update(errors)
            worst = max(e for name, e in errors.items() if name.endswith("_err"))
            row["max_err"] = worst
            row["status"] = "pass" if worst <= TOLERANCE[dtype] else "FAIL"
        except Exception as error:
            row.update(status="error", error=f"{type(error).__name__}: {error}")
        check.report["correctness"].append(row)


def section_opcheck(check: Check) -> None:
    for op in OPS:
        for qualname, func, args in captured_custom_op_calls(op, check.device):
            row = {"op": op, "custom_op": qualname}
            try:
                result = torch.library.opcheck(func, args)
                row.update(status="pass", tests={k: str(v) for k, v in result.items()})
            except Exception as error:
                row.update(status="FAIL", error=f"{type(error).__name__}: {str(error)[:2000]}")
            check.report["opcheck"].append(row)


def section_compile(check: Check) -> None:
    backend = "eager" if check.smoke else "inductor"  # smoke: Dynamo tracing (graph breaks) without a compiler
    for op in OPS:
        if check.left_s() <= 0:
            return
        row = {"op": op, "backend": backend, "fullgraph": True}
        try:
            fn, args = public_call(op, "tiny" if check.smoke else "small", torch.float32, check.device)
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=backend, fullgraph=True)
            row["max_err"] = max_normwise_err(compiled(*args), fn(*args))
            row["status"] = "pass" if row["max_err"] <= TOLERANCE[torch.float32] else "FAIL"
        except Exception as error:
            row.update(status="FAIL", error=f"{type(error).__name__}: {str(error)[:2000]}")
        check.report["compile"].append(row)


def section_determinism(check: Check) -> None:
    for op in OPS:
        size = "tiny" if check.smoke else "large"
        first = forward_and_grads(op, size, torch.float32, check.device, seed=5)
        second = forward_and_grads(op, size, torch.float32, check.device, seed=5)
        equal = all(torch.equal(a, b) for a, b in zip(first, second))
        check.report["determinism"].append({"op": op, "size": size, "bitwise_equal": equal,
                                            "max_err": max_normwise_err(first, second)})


# ---- engine iterations: CUDA against CPU, host syncs ------------------------------------------------
def section_iterations(check: Check) -> None:
    other = "cpu"  # smoke: CPU against CPU, which only exercises the code path
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 to fp32
    try:
        for method in ("dm", "sgs", "robust"):
            row = {"method": method, "devices": [check.device, other], "tf32": False}
            try:
                step_here = one_iteration_update(method, check.device, check.smoke)
                step_other = one_iteration_update(method, other, check.smoke)
                row["update_err"] = max_normwise_err([step_here.cpu()], [step_other.cpu()])
                row["tolerance"] = 1e-3
                row["status"] = "pass" if row["update_err"] <= 1e-3 else "FAIL"
            except Exception as error:
                row.update(status="error", error=f"{type(error).__name__}: {error}")
            check.report["iterations"].append(row)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def section_host_syncs(check: Check) -> None:
    from fastdd.sync import count_host_syncs
    for method in ("dm", "sgs", "robust"):
        engine = small_engine(method, check.device, check.smoke)
        for i in range(2):  # warm caches and lazy initialisation
            engine.method.iteration(engine, i)
        _sync(check.device)
        on_gpu = torch.device(check.device).type == "cuda"
        # On a GPU only real device syncs count; the CPU run counts the calls that would sync there.
        with count_host_syncs(cuda=on_gpu, cpu_proxies=not on_gpu) as syncs:
            engine.method.iteration(engine, 2)
        _sync(check.device)
        check.report["host_syncs"].append({"method": method, "per_iteration": syncs.count,
                                           "counted": "CUDA sync debug mode" if on_gpu else "CPU proxies",
                                           "events": syncs.events[:40]})


# ---- performance -----------------------------------------------------------------------------------
def section_perf_ops(check: Check) -> None:
    copy_gbps = bandwidth_floor_gbps(check.device, nbytes=(8 if check.smoke else 1024) * 2**20)
    check.report["memory"]["copy_bandwidth_gbps"] = copy_gbps
    repeats = 3 if check.smoke else 20
    for op in FUSED_KERNELS:
        for size in (("tiny",) if check.smoke else ("small", "large")):
            if check.left_s() <= 0:
                return
            fast, reference, args, nbytes = kernel_and_reference(op, size, check.device)
            providers = {"fastdd": fast, "eager reference": reference}
            if not check.smoke and check.left_s() > 30:  # an inductor compile takes tens of seconds
                providers["torch.compile reference"] = torch.compile(reference, fullgraph=False)
            for provider, fn in providers.items():
                row = {"op": op, "size": size, "provider": provider, "bytes": nbytes}
                try:
                    with torch.no_grad():
                        timing = time_device(lambda: fn(*args), check.device, warmup=2, repeats=repeats)
                    gbps = nbytes / timing["median_s"] / 1e9
                    row.update(timing, gbps=gbps, pct_of_copy_bandwidth=100 * gbps / copy_gbps)
                except Exception as error:
                    row.update(status="error", error=f"{type(error).__name__}: {str(error)[:1000]}")
                check.report["perf_ops"].append(row)


def section_perf_dm(check: Check) -> None:
    for case in dm_perf_cases(check.smoke):
        if check.left_s() <= 0:
            return
        check.report["perf_dm"].extend(time_dm_case(case, check.device, check.smoke, check.left_s))


def section_memory(check: Check) -> None:
    if torch.device(check.device).type == "cuda":
        check.report["memory"]["max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        check.report["memory"]["max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20


SECTIONS = [("correctness", section_correctness, False), ("opcheck", section_opcheck, False),
            ("determinism", section_determinism, False), ("iterations", section_iterations, False),
            ("host_syncs", section_host_syncs, False), ("compile", section_compile, True),
            ("perf_dm", section_perf_dm, True), ("perf_ops", section_perf_ops, True),
            ("memory", section_memory, False)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a few seconds: checks the script")
    p.add_argument("--budget-s", type=float, default=400.0, help="perf sections stop once this has passed")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else benchmarks/results/)")
    p.add_argument("--sections", default=",".join(name for name, _, _ in SECTIONS))
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
    wanted = args.sections.split(",")
    unknown = sorted(set(wanted) - {name for name, _, _ in SECTIONS})
    if unknown:
        raise ValueError(f"--sections: unknown section(s) {unknown}")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible; use --smoke for the CPU smoke run")
    name = "gpu_check_smoke.json" if args.smoke else "gpu_check.json"
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results"), name)
    if args.smoke:
        torch.set_num_threads(1)
    check = Check(device, args.smoke, args.budget_s, out)
    for section_name, fn, perf in SECTIONS:
        if section_name in wanted:
            check.section(section_name, fn, perf)
    print(f"wrote {out}")
    return check.report


if __name__ == "__main__":
    main()
