"""Experiment: base (dm or gm) vs Robust DD on that base, subpopulation-shift MNIST (5% rotated), IPC 10, worst-group."""
import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

import torch  # noqa: E402
from harness import mean_std  # noqa: E402

from fastdd.data import load_dataset  # noqa: E402
from fastdd.distill import Distiller, build_config  # noqa: E402
from fastdd.distill.methods.robust_data import subpop_data  # noqa: E402
from fastdd.evaluate import evaluate_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("FASTDD_SHARED", REPO.parent / "shared")) / "data" / "mnist-t10k"
RESULTS = REPO / "benchmarks" / "results"
OUT = {"dm": RESULTS / "robust_subpop.json", "gm": RESULTS / "robust_subpop_gm.json"}

# Scaled down to fit <= 25-40 min of a shared, heavily loaded 2-core CPU (paper-scale: ConvNet-128, 20k iterations,
# batch_real 256, 1000 evaluation epochs, 5+ evaluation models). Per base: its own keys, given to the plain base
# run AND to robust (robust passes the gm keys on to its gm base); recluster_every is robust's, in outer iterations.
SETTINGS = dict(ipc=10, model="ConvNetW32", eval_model="ConvNetW32", eval_epochs=100,
                eval_models=2, seeds=[0, 1, 2], torch_threads=1, budget_s=40 * 60,
                robust=dict(k=4, alpha=0.5, beta=0.5, assignment="kmeans", embedding="random-net"),
                base=dict(dm=dict(iterations=120, batch_real=64, recluster_every=60),
                          # as exp_dasm's gm: few outer iterations, a short inner loop, IDC's lr_img/clamp/aug
                          gm=dict(iterations=24, inner_loop=4, batch_real=32, factor=1, distance="idc_l1",
                                  batch_syn_max=32, n_data=64, net_batch=32, recluster_every=12)),
                data=dict(transform="rotate", rare_fraction=0.05, angle_range=[60, 90], test_fraction=0.2,
                          split_seed=0))
METRICS = ("mean", "worst_group", "rotated", "common", "worst_cluster")


def rare_capture(engine) -> dict:
    """How well the K-means clusters isolate the rare group: per class, the cluster holding most rare images —
    its share of the class's rare images (recall) and the rare fraction inside it (precision); class means."""
    ids, train = engine.method.cluster_ids, engine.train
    if ids is None:
        return {}
    k, recall, precision = engine.method.args.k, [], []
    for c in range(train.num_classes):
        rows = train.labels == c
        rare = torch.bincount(ids[rows & (train.domains == 1)], minlength=k).double()
        size = torch.bincount(ids[rows], minlength=k).double()
        best = int(rare.argmax())
        recall.append(float(rare[best] / rare.sum()))
        precision.append(float(rare[best] / size[best]))
    return {"rare_recall": statistics.fmean(recall), "rare_precision": statistics.fmean(precision)}


def method_config(method, base, seed) -> dict:
    """The run's config: `base` alone (method == base) or robust on `base`, with the base's keys either way."""
    s = SETTINGS
    base_keys = dict(s["base"][base])
    recluster_every = base_keys.pop("recluster_every")
    extra = {**s["robust"], "recluster_every": recluster_every, "base": base} if method == "robust" else {}
    return {"method": method, "ipc": s["ipc"], "model": s["model"], "seed": seed, "device": "cpu",
            "progress": False, "checkpoint_every": 0, **base_keys, **extra}


def distill_and_evaluate(method, base, data, seed, extra=None):
    train, test, evaluators = data
    s = SETTINGS
    cfg = build_config({**method_config(method, base, seed), **(extra or {})})
    engine = Distiller(cfg, train, None)  # evaluated below with the experiment's protocol
    start = time.perf_counter()
    metrics = engine.run()
    seconds = time.perf_counter() - start
    images, labels = engine.final_set()
    summary = evaluate_synthetic(images, labels, test, models=(s["eval_model"],), num_models=s["eval_models"],
                                 epochs=s["eval_epochs"], seed=1000 + seed, device="cpu",
                                 extra_metrics=evaluators)[s["eval_model"]]
    row = {"method": method, "base": base, "seed": seed, **(extra or {}), "distill_seconds": seconds,
           "seconds_per_iteration": metrics["seconds_per_iteration"], "final_loss": metrics["final_loss"],
           "mean": summary["mean"], "worst_group": summary["worst_group_accuracy_mean"],
           "rotated": summary["accuracy_group_rotated_mean"], "common": summary["accuracy_group_common_mean"],
           "worst_cluster": summary["worst_cluster_accuracy_mean"], "accuracies": summary["accuracies"],
           "worst_group_values": summary["worst_group_accuracy_values"]}
    if method == "robust":
        row["robust"] = {k: v for k, v in metrics["robust"].items() if k.endswith("_mean") or k == "reclusters"}
        row["robust"].update(rare_capture(engine))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", choices=("dm", "gm"), default="dm", help="the method robust wraps and is compared to")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/robust_subpop.json (dm), "
                                                     "robust_subpop_gm.json (gm)")
    parser.add_argument("--control-lr", default="", help="comma-separated lr_img values: add runs of the plain "
                        "base at each (is robust's gain just a larger step?) to the existing --out JSON")
    args = parser.parse_args()
    base, out = args.base, args.out or str(OUT[args.base])
    torch.set_num_threads(SETTINGS["torch_threads"])
    t0 = time.perf_counter()
    d = SETTINGS["data"]
    pool = load_dataset("mnist", split="test", root=str(MNIST))
    data = subpop_data(pool, d["transform"], seed=d["split_seed"], rare_fraction=d["rare_fraction"],
                       test_fraction=d["test_fraction"], angle_range=tuple(d["angle_range"]))
    train, test, _ = data
    if args.control_lr:
        control(base, out, data, [float(v) for v in args.control_lr.split(",")])
        return
    settings = {**{k: v for k, v in SETTINGS.items() if k != "base"}, "base": base, base: SETTINGS["base"][base]}
    report = {"experiment": f"{base} vs Robust DD (base={base}) on subpopulation-shift MNIST, IPC 10",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": "python benchmarks/exp_robust_subpop.py --base " + base, "settings": settings,
              "data": {"source": "shared MNIST t10k (10,000 images)", "train_size": len(train),
                       "train_rare": int((train.domains == 1).sum()), "test_size": len(test),
                       "test_rare": int((test.domains == 1).sum()),
                       "metrics": "mean: test accuracy; worst_group: min over the 20 (class, group) cells; "
                                  "rotated/common: accuracy on each group; worst_cluster: min over (class, test "
                                  "K-means cluster) cells, 4 clusters per class on raw pixels"},
              "runs": [], "complete": False}

    def save():
        report["elapsed_s"] = time.perf_counter() - t0
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))

    for seed in SETTINGS["seeds"]:
        for method in (base, "robust"):
            if time.perf_counter() - t0 > SETTINGS["budget_s"]:
                print("time budget reached: stopping with partial results", flush=True)
                save()
                return
            row = distill_and_evaluate(method, base, data, seed)
            report["runs"].append(row)
            print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {method}: mean {row['mean']:.4f} worst-group "
                  f"{row['worst_group']:.4f} rotated {row['rotated']:.4f} worst-cluster {row['worst_cluster']:.4f}",
                  flush=True)
            save()
    summary = {m: {k: mean_std([r[k] for r in report["runs"] if r["method"] == m]) for k in METRICS}
               for m in (base, "robust")}
    pairs = list(zip([r for r in report["runs"] if r["method"] == base],
                     [r for r in report["runs"] if r["method"] == "robust"]))
    summary[f"robust_minus_{base}"] = {k: {**mean_std([b[k] - a[k] for a, b in pairs]),
                                           "per_seed": [b[k] - a[k] for a, b in pairs]} for k in METRICS}
    report["summary"], report["complete"] = summary, True
    save()
    print(json.dumps(summary, indent=1))


def control(base, out, data, lrs):
    """Step-size control: the plain base at larger lr_img on the same seeds, paired with its default-lr runs
    and with robust's (robust's objective is larger than the base loss, so its image step is larger)."""
    report = json.loads(Path(out).read_text())
    t0 = time.perf_counter() - report.get("control_lr", {}).get("elapsed_s", 0.0)
    ctrl = report.setdefault("control_lr", {"lr_img": lrs, "rows": []})
    ctrl["command"] = f"python benchmarks/exp_robust_subpop.py --base {base} --control-lr " + ",".join(map(str, lrs))
    runs = {m: {r["seed"]: r for r in report["runs"] if r["method"] == m} for m in (base, "robust")}
    for seed in SETTINGS["seeds"]:
        for lr in lrs:
            row = distill_and_evaluate(base, base, data, seed, {"lr_img": lr})
            ctrl["rows"].append(row)
            print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {base} lr_img={lr}: mean {row['mean']:.4f} "
                  f"worst-group {row['worst_group']:.4f} rotated {row['rotated']:.4f}", flush=True)
            ctrl["elapsed_s"] = time.perf_counter() - t0
            Path(out).write_text(json.dumps(report, indent=1))
    summary = {}
    for lr in lrs:
        rows = [r for r in ctrl["rows"] if r["lr_img"] == lr and r["seed"] in runs[base] and r["seed"] in runs["robust"]]
        summary[f"lr{lr}"] = {k: mean_std([r[k] for r in rows]) for k in METRICS}
        for name, ref, sign in ((f"lr{lr}_minus_{base}", base, 1), (f"robust_minus_lr{lr}", "robust", -1)):
            diffs = {k: [sign * (r[k] - runs[ref][r["seed"]][k]) for r in rows] for k in METRICS}
            summary[name] = {k: {**mean_std(v), "per_seed": v} for k, v in diffs.items()}
    ctrl["summary"] = summary
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
