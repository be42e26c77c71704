"""Benchmark: one SGS iteration vs one DM iteration (same run) vs a naive SGS (D backward passes + per-domain FFTs)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import Results, parse_args, time_fn  # noqa: E402

from fastdd.data import from_tensors  # noqa: E402
from fastdd.data.domains import rotated_mnist  # noqa: E402
from fastdd.distill import Distiller, build_config  # noqa: E402
from fastdd.ops import mean_match  # noqa: E402
from fastdd.distill.methods.dm import dm_loss  # noqa: E402
from fastdd.distill.methods.sgs import diversity_loss  # noqa: E402
from fastdd.distill.methods.sgs_data import domain_generalization_data  # noqa: E402
from fastdd.reference.spectral_surgery import spectral_surgery as reference_surgery  # noqa: E402

# (model, batch_real per class, ipc); MNIST-shaped 1x28x28, 10 classes, Rotated-MNIST: 5 source domains.
CASES = [("ConvNet", 256, 10), ("ConvNetW32", 256, 10), ("ConvNet", 256, 50)]
CPU_CASES = [("ConvNetW32", 64, 10), ("ConvNet", 32, 10)]
QUICK_CASES = [("ConvNetW32", 10, 2)]
SGS_ARGS = {"lambda_sh": 1.0, "lambda_div": 100.0, "tau": 0.5, "holdout_domain": "75"}
BACKWARDS = ("vmap", "func", "loop")


def synthetic_rotated_mnist(per_class: int = 420):
    """Random MNIST-shaped digits (content does not matter for timing) through the Rotated-MNIST builder."""
    g = torch.Generator().manual_seed(0)
    n = 10 * per_class
    digits = from_tensors(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                          torch.arange(n) % 10, num_classes=10, mean=(0.1307,), std=(0.3081,))
    return domain_generalization_data(rotated_mnist(digits), "75", test_fraction=0.1)


def naive_update(engine, method):
    """D separate backward passes, one DM backward, one diversity backward, per-domain rfft2 loop."""
    a = method.args
    batch, _ = method._forward(engine, batched=False)
    real_dom = method.domain_of(engine, batch.real_index)
    images = engine.syn.images
    g_dm = torch.autograd.grad(dm_loss(batch, engine.num_classes), images, retain_graph=True)[0]
    g_d = torch.stack([torch.autograd.grad(
        mean_match(batch.real_features[real_dom == d], batch.real_seg[real_dom == d], batch.syn_features,
                   batch.syn_seg, engine.num_classes).sum(), images, retain_graph=True)[0] for d in range(method.D)])
    g_div = torch.autograd.grad(diversity_loss(batch.syn_features, batch.syn_seg, engine.num_classes), images)[0]
    shared, _ = reference_surgery(g_d, a.tau, a.gamma, a.eps)
    return g_dm + a.lambda_sh * shared + a.lambda_div * g_div


def make_engine(data, method, model, batch_real, ipc, device, **extra):
    cfg = build_config({"method": method, "model": model, "batch_real": batch_real, "ipc": ipc, "device": device,
                        "progress": False, **(SGS_ARGS if method == "sgs" else {}), **extra})
    engine = Distiller(cfg, data[0], None)
    engine.method.prepare(engine)
    return engine


def main():
    args = parse_args(__doc__, "benchmarks/results/sgs_iteration.json")
    device = torch.device(args.device)
    if device.type == "cpu":  # the shared CPU is oversubscribed: one thread per process measures more steadily
        torch.set_num_threads(1)
    cases = QUICK_CASES if args.quick else (CASES if device.type == "cuda" else CPU_CASES)
    repeats = 2 if args.quick else args.repeats
    data = synthetic_rotated_mnist()
    results = Results("sgs_iteration", device)
    for model, batch_real, ipc in cases:
        shape = dict(model=model, batch_real=batch_real, ipc=ipc, classes=10, domains=5, image="1x28x28",
                     sgs_args=SGS_ARGS, threads=torch.get_num_threads())
        dm = make_engine(data, "dm", model, batch_real, ipc, device)
        t_dm = time_fn(lambda: dm.method.iteration(dm, 0), device, warmup=1, repeats=repeats)["median_s"]
        results.add(**shape, variant="dm", median_s=t_dm, ratio_to_dm=1.0)
        sgs_times = {}
        for backward in BACKWARDS:
            eng = make_engine(data, "sgs", model, batch_real, ipc, device, backward=backward)
            try:
                t = time_fn(lambda: eng.method.iteration(eng, 0), device, warmup=1, repeats=repeats)["median_s"]
            except RuntimeError as error:  # e.g. torch.func on a network with functorch-incompatible ops
                results.add(**shape, variant=f"sgs[{backward}]", error=str(error)[:200])
                continue
            sgs_times[backward] = t
            results.add(**shape, variant=f"sgs[{backward}]", median_s=t, ratio_to_dm=t / t_dm)
        naive = make_engine(data, "sgs", model, batch_real, ipc, device)
        state = naive.generator.get_state()
        fast = naive.method.compute(naive, 0).grad
        naive.generator.set_state(state)
        reference = naive_update(naive, naive.method)
        max_diff = float((fast - reference).abs().max() / reference.abs().max())
        t_naive = time_fn(lambda: naive.image_step(grad=naive_update(naive, naive.method)), device, warmup=1,
                          repeats=repeats)["median_s"]
        results.add(**shape, variant="naive_sgs", median_s=t_naive, ratio_to_dm=t_naive / t_dm,
                    sgs_vs_naive_max_rel_diff=max_diff,
                    naive_over_sgs={k: t_naive / v for k, v in sgs_times.items()},
                    goal="GPU: sgs <= 1.5x dm and naive >= 3x sgs; CPU rows as measured")
    if not args.quick:
        results.write(args.out)


if __name__ == "__main__":
    main()
