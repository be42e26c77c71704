"""GM iteration: fastdd's class-batched gradient matching vs IDC's per-class loop, same run, interleaved repeats."""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the IDC-style oracle lives beside the tests
from gm_reference_loop import reference_iteration, reference_match_step  # noqa: E402
from harness import Results  # noqa: E402

SHARED = os.environ.get("FASTDD_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CASES = {  # name: (dataset, model, ipc, factor, batch_real, inner_loop for the full-iteration timing)
    "digits-ipc10": ("digits", "ConvNet", 10, 2, 64, 4),
    "digits-ipc50": ("digits", "ConvNet", 50, 2, 64, 2),
    "mnist-ipc10": ("mnist", "ConvNetW32", 10, 2, 64, 2),  # width 32: width 128 at 28 px is minutes here
}


def _train(name):
    from fastdd.data import load_dataset
    if name == "mnist":
        return load_dataset("mnist", split="test", root=os.path.join(SHARED, "data", "mnist-t10k"))
    return load_dataset(name)


def _engine(train, model, ipc, factor, batch_real, inner_loop, chunk, device):
    from fastdd.distill import Distiller, build_config
    cfg = build_config(overrides=["method=gm", f"model={model}", f"ipc={ipc}", f"factor={factor}",
                                  f"batch_real={batch_real}", f"inner_loop={inner_loop}", f"class_chunk={chunk}",
                                  "progress=false", f"device={device}",
                                  # the loop oracle's settings: engine DSA, no CutMix, normalised-space steps
                                  "aug=dsa", "mixup_net=vanilla", "pixel_space=false"])
    engine = Distiller(cfg, train)
    engine.method.prepare(engine)
    return engine


def _match_once(engine, provider):
    """One matching step (every class + its image step) on a fixed network and batch: the network gm builds
    (nn modules, weights trainable), the same for both providers."""
    state = engine.method.begin_iteration(engine, 0)
    net = state.net
    index, seg = engine.sample_real_index(engine.config.batch_real)
    draw = engine.draw_augmentation()
    select = engine.method.draw_selection(engine)
    if provider == "reference loop":
        decode = lambda x, y: engine.method.decode(engine, x, y)  # noqa: E731
        return lambda: reference_match_step(net, engine, index, seg, draw, select, engine.optimizer, decode,
                                            engine.method.args.distance)
    def step():
        grad, _ = engine.method.match_grad(engine, state.grads, index, seg, draw, select)
        engine.sequential_class_step(grad)
    return step


def _iteration(engine, provider):
    if provider == "reference loop":
        decode = lambda x, y: engine.method.decode(engine, x, y)  # noqa: E731
        return lambda: reference_iteration(engine, engine.method.args, decode, fused=False)
    return lambda: engine.method.iteration(engine, 0)


def _malloc() -> str:
    """glibc returns tensors over 32 MiB to the OS on free (page faults on the next big batch); these keep them."""
    tuned = [f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ]
    return "glibc " + (" ".join(tuned) if tuned else "default")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(case, repeats, device, chunks, profile=False):
    dataset, model, ipc, factor, batch_real, inner_loop = CASES[case]
    train = _train(dataset)
    providers = ["reference loop"] + [f"fastdd class_chunk={c}" for c in chunks]
    engines = {p: _engine(train, model, ipc, factor, batch_real, inner_loop,
                          0 if p == "reference loop" else int(p.split("=")[1]), device) for p in providers}
    rows = []
    for what, make in (("match step", _match_once), ("outer iteration", _iteration)):
        times = {p: [] for p in providers}
        for rep in range(repeats + 1):  # interleaved; the first round is warm-up
            for p in providers:
                fn = make(engines[p], p)
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if rep:
                    times[p].append(time.perf_counter() - t0)
        ref = statistics.median(times["reference loop"])
        tables = {}
        if profile and what == "match step":
            from bench_dm_iteration import profile_table
            tables = {p: profile_table(make(engines[p], p), iterations=1) for p in providers}
        for p in providers:
            med = statistics.median(times[p])
            rows.append(dict(case=case, timed=what, provider=p, dataset=dataset, model=model, ipc=ipc, factor=factor,
                             batch_real=batch_real, inner_loop=inner_loop if what == "outer iteration" else 1,
                             median_s=med, all_s=times[p], speedup_vs_reference=ref / med,
                             threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0], malloc=_malloc(),
                             profile=tables.get(p)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gm_iteration.json"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core box is oversubscribed)")
    p.add_argument("--chunks", default="0,10", help="fastdd class_chunk settings (0: auto)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the match step per provider")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = Results("gm_iteration", device)
    for case in args.cases.split(","):
        for row in measure(case, args.repeats, device, [int(c) for c in args.chunks.split(",")], args.profile):
            res.add(**row)
    res.write(args.out)


if __name__ == "__main__":
    main()
