"""Accuracy check: fastdd DM vs the per-class reference loop (equal iterations) vs random real images, on MNIST."""
import argparse
import datetime
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FASTDD_SHARED", os.path.join(os.path.dirname(REPO), "shared"))

from fastdd.data import load_dataset, split_dataset  # noqa: E402
from fastdd.distill import Distiller, Method, MethodOutput, build_config  # noqa: E402
from fastdd.evaluate import evaluate_synthetic  # noqa: E402
from fastdd.reference.dm_loop import reference_dm_loss  # noqa: E402


class ReferenceLoopDM(Method):
    """DM computed the reference way (one class at a time, a DSA draw per class), on the same engine."""
    name = "dm-reference-loop"

    def compute(self, engine, iteration):
        net = engine.new_network()
        index, seg = engine.sample_real_index(engine.config.batch_real)
        draw = engine.draw_augmentation()
        real = engine.real_images(index)
        real_by_class = [real[seg == c] for c in range(engine.num_classes)]
        return MethodOutput(loss=reference_dm_loss(net, real_by_class, engine.syn.images, engine.config.ipc, draw))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/dm_accuracy_mnist.json")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--eval-models", type=int, default=3)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    mnist = load_dataset("mnist", split="test", root=os.path.join(SHARED, "data", "mnist-t10k"))
    pool, test = split_dataset(mnist, test_fraction=0.2, seed=0)
    cfg = build_config(overrides=[f"ipc=10", f"iterations={args.iterations}", f"batch_real={args.batch_real}",
                                  "progress=false", f"seed={args.seed}", f"eval_num_models={args.eval_models}",
                                  f"eval_epochs={args.eval_epochs}"])
    rows = {}
    for label, method in (("fastdd DM", None), ("per-class reference loop", ReferenceLoopDM())):
        t0 = time.perf_counter()
        engine = Distiller(cfg, pool, test, method=method)
        init_images = engine.syn.images.detach().clone()
        metrics = engine.run()
        rows[label] = {"accuracy": metrics["evaluations"][-1]["ConvNet"], "final_loss": metrics["final_loss"],
                       "seconds_per_iteration": metrics["seconds_per_iteration"],
                       "wall_seconds": time.perf_counter() - t0}
        print(label, rows[label]["accuracy"]["mean"], flush=True)
    # Random real images = the same real initialisation both runs started from, undistilled.
    rows["random real images"] = {"accuracy": evaluate_synthetic(
        init_images, engine.syn.labels.cpu(), test, num_models=args.eval_models, epochs=args.eval_epochs,
        seed=args.seed)["ConvNet"]}
    a, b = rows["fastdd DM"]["accuracy"], rows["per-class reference loop"]["accuracy"]
    noise = (a["std"] ** 2 + b["std"] ** 2) ** 0.5
    summary = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": "cpu",
        "data": "shared MNIST t10k split 80/20 (class-stratified, seed 0): 8000 pool / 2000 test",
        "settings": {"ipc": 10, "iterations": args.iterations, "batch_real": args.batch_real, "model": "ConvNet",
                     "dsa": cfg.dsa_strategy, "eval_models": args.eval_models, "eval_epochs": args.eval_epochs,
                     "note": "scaled down from the paper's 20,000 iterations / batch_real 256 to fit a 2-core CPU"},
        "results": rows,
        "dm_runs_agree_within_noise": abs(a["mean"] - b["mean"]) <= 2 * max(noise, 0.005),
        "both_beat_random_real": a["mean"] > rows["random real images"]["accuracy"]["mean"]
        and b["mean"] > rows["random real images"]["accuracy"]["mean"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
