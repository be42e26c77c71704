"""Experiment: DM vs DM+SGS on Rotated-MNIST (hold out 75°), IPC 10, λ/τ tuned on a source validation domain (60°)."""
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
from fastdd.data.domains import rotated_mnist  # noqa: E402
from fastdd.distill import Distiller, build_config  # noqa: E402
from fastdd.distill.methods.sgs_data import domain_generalization_data  # noqa: E402
from fastdd.evaluate import evaluate_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("FASTDD_SHARED", REPO.parent / "shared")) / "data" / "mnist-t10k"
OUT = REPO / "benchmarks" / "results" / "sgs_rotated_mnist.json"
OUT_DEFAULTS = REPO / "benchmarks" / "results" / "sgs_rotated_mnist_defaults.json"

# Scaled down to fit <= 25 min of a shared 2-core CPU (the paper-scale protocol is ConvNet-128, 20k iterations,
# batch_real 256, 1000 evaluation epochs, 5-20 models).
SETTINGS = dict(ipc=10, iterations=100, batch_real=32, model="ConvNetW32", eval_model="ConvNetW32", eval_epochs=100,
                eval_models_final=2, eval_models_tune=1, seeds=[0, 1, 2], torch_threads=1, holdout="75",
                validation_holdout="60", sgs_backward="loop", budget_s=24 * 60)
# Tiny grid, judged on the validation source domain only (75° is never seen while tuning).
GRID = [dict(lambda_sh=1.0, tau=0.5, lambda_div=0.0), dict(lambda_sh=1.0, tau=0.8, lambda_div=100.0)]


def distill_and_evaluate(method, args, data, seed, num_models, settings=None):
    train, test, evaluators = data
    s = SETTINGS if settings is None else settings
    cfg = build_config({"method": method, "ipc": s["ipc"], "iterations": s["iterations"], "batch_real": s["batch_real"],
                        "model": s["model"], "seed": seed, "device": "cpu", "progress": False, "checkpoint_every": 0,
                        **args})
    engine = Distiller(cfg, train, None)  # evaluated below with the chosen number of models
    start = time.perf_counter()
    metrics = engine.run()
    seconds = time.perf_counter() - start
    images, labels = engine.final_set()
    result = evaluate_synthetic(images, labels, test, models=(s["eval_model"],), num_models=num_models,
                                epochs=s["eval_epochs"], seed=1000 + seed, device="cpu", extra_metrics=evaluators)
    summary = result[s["eval_model"]]
    return {"method": method, "args": args, "seed": seed, "distill_seconds": seconds,
            "seconds_per_iteration": metrics["seconds_per_iteration"], "final_loss": metrics["final_loss"],
            "ood": summary["ood_accuracy_mean"], "id": summary["id_accuracy_mean"], "all_domains": summary["mean"],
            "per_domain": {k[len("accuracy_domain_"):-len("_mean")]: v for k, v in summary.items()
                           if k.startswith("accuracy_domain_") and k.endswith("_mean")},
            "ood_values": summary["ood_accuracy_values"], "id_values": summary.get("id_accuracy_values"),
            "sgs": metrics.get("sgs")}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--only-control", action="store_true",
                        help="add the step-size control to an existing --out JSON instead of rerunning everything")
    parser.add_argument("--defaults", action="store_true",
                        help="no tuning: dm, sgs with the library's defaults and sgs with lambda_div=0, same seeds "
                             "(default --out: sgs_rotated_mnist_defaults.json)")
    parser.add_argument("--seeds", default=None, help="--defaults only: comma-separated seeds (default: SETTINGS)")
    args = parser.parse_args()
    torch.set_num_threads(SETTINGS["torch_threads"])
    if args.defaults:
        seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else SETTINGS["seeds"]
        defaults_run(args.out if args.out != str(OUT) else str(OUT_DEFAULTS), seeds)
        return
    t0 = time.perf_counter()
    source = load_dataset("mnist", split="test", root=str(MNIST))
    full = rotated_mnist(source, seed=0)  # each image in ONE domain (DomainBed); ~1,667 images per domain
    final_data = domain_generalization_data(full, SETTINGS["holdout"])
    without_target = full.subset(full.domains != full.domain_names.index(SETTINGS["holdout"]))
    val_data = domain_generalization_data(without_target, SETTINGS["validation_holdout"])
    report = {"experiment": "SGS vs DM, Rotated-MNIST, leave-75°-out", "settings": SETTINGS, "grid": GRID,
              "data": {"source": "shared MNIST t10k (10,000 images)", "assignment": "each image in exactly one "
                       "rotated domain (DomainBed: shuffled, dealt round-robin over 0..75°)",
                       "split": "per (class, domain): 70% distillation pool / 30% test",
                       "train_size": len(final_data[0]), "test_size": len(final_data[1]),
                       "validation": "sources 0..45°, pseudo-held-out 60°, 75° removed"},
              "tuning": [], "final": [], "complete": False}

    def save():
        report["elapsed_s"] = time.perf_counter() - t0
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    def over_budget():
        return time.perf_counter() - t0 > SETTINGS["budget_s"]

    if args.only_control:
        report = json.loads(Path(args.out).read_text())
        t0 -= report["elapsed_s"]
        control(report, final_data, save)
        return
    sgs_fixed = {"backward": SETTINGS["sgs_backward"]}
    for method, extra in [("dm", {})] + [("sgs", {**g, **sgs_fixed, "holdout_domain": SETTINGS["validation_holdout"]})
                                         for g in GRID]:
        row = distill_and_evaluate(method, extra, val_data, 0, SETTINGS["eval_models_tune"])
        report["tuning"].append(row)
        print(f"[{time.perf_counter() - t0:6.0f}s] tune {method} {extra}: val OOD(60) {row['ood']:.4f} "
              f"ID {row['id']:.4f}", flush=True)
        save()
    sgs_rows = [r for r in report["tuning"] if r["method"] == "sgs"]
    best = max(sgs_rows, key=lambda r: r["ood"])
    chosen = {k: best["args"][k] for k in ("lambda_sh", "tau", "lambda_div")}
    report["chosen"] = {**chosen, "by": "validation OOD accuracy on the 60° source domain"}
    for seed in SETTINGS["seeds"]:
        for method, extra in (("dm", {}), ("sgs", {**chosen, **sgs_fixed, "holdout_domain": SETTINGS["holdout"]})):
            if over_budget():
                print("time budget reached: stopping with partial results", flush=True)
                save()
                return
            row = distill_and_evaluate(method, extra, final_data, seed, SETTINGS["eval_models_final"])
            report["final"].append(row)
            print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {method}: OOD(75) {row['ood']:.4f} "
                  f"ID {row['id']:.4f}", flush=True)
            save()
    summary = {}
    for method in ("dm", "sgs"):
        rows = [r for r in report["final"] if r["method"] == method]
        summary[method] = {"ood": mean_std([r["ood"] for r in rows]), "id": mean_std([r["id"] for r in rows]),
                           "seconds_per_iteration": mean_std([r["seconds_per_iteration"] for r in rows]),
                           "per_domain": {d: statistics.fmean(r["per_domain"][d] for r in rows)
                                          for d in rows[0]["per_domain"]}}
    pairs = list(zip([r for r in report["final"] if r["method"] == "dm"],
                     [r for r in report["final"] if r["method"] == "sgs"]))
    summary["sgs_minus_dm"] = {"ood": mean_std([s["ood"] - d["ood"] for d, s in pairs]),
                               "id": mean_std([s["id"] - d["id"] for d, s in pairs])}
    report["summary"], report["complete"] = summary, True
    save()
    print(json.dumps(summary, indent=1))
    control(report, final_data, save)


DEFAULT_VARIANTS = {"dm": ("dm", {}), "sgs": ("sgs", {}), "sgs_div0": ("sgs", {"lambda_div": 0.0})}


def defaults_run(out, seeds):
    """DM vs SGS at the library's defaults (the diversity branch on) vs SGS without it, paired by seed."""
    from fastdd.distill.methods.sgs import SGSArgs
    t0 = time.perf_counter()
    full = rotated_mnist(load_dataset("mnist", split="test", root=str(MNIST)), seed=0)
    data = domain_generalization_data(full, SETTINGS["holdout"])
    fixed = {"backward": SETTINGS["sgs_backward"], "holdout_domain": SETTINGS["holdout"]}
    report = {"experiment": "DM vs SGS (library defaults) vs SGS with lambda_div=0, Rotated-MNIST, leave-75°-out",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": "python benchmarks/exp_sgs_rotated_mnist.py --defaults --seeds " + ",".join(map(str, seeds)),
              "settings": {**{k: v for k, v in SETTINGS.items() if k not in ("validation_holdout", "eval_models_tune")},
                           "seeds": seeds},
              "sgs_defaults": {k: getattr(SGSArgs(), k) for k in ("lambda_sh", "lambda_div", "tau", "gamma")},
              "variants": {k: v[1] for k, v in DEFAULT_VARIANTS.items()},
              "data": {"train_size": len(data[0]), "test_size": len(data[1])}, "rows": [], "complete": False}

    def save():
        report["elapsed_s"] = time.perf_counter() - t0
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))

    seeds_done = []
    for seed in seeds:  # seed outer: a budget stop keeps complete, paired seeds
        if time.perf_counter() - t0 > SETTINGS["budget_s"]:
            print("time budget reached: summarising the complete seeds", flush=True)
            break
        for name, (method, extra) in DEFAULT_VARIANTS.items():
            row = distill_and_evaluate(method, {**extra, **fixed} if method == "sgs" else extra, data, seed,
                                       SETTINGS["eval_models_final"])
            report["rows"].append({"variant": name, **row})
            print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {name}: OOD(75) {row['ood']:.4f} "
                  f"ID {row['id']:.4f}", flush=True)
            save()
        seeds_done.append(seed)
    by = {name: [r for r in report["rows"] if r["variant"] == name and r["seed"] in seeds_done]
          for name in DEFAULT_VARIANTS}
    summary = {"seeds": seeds_done}
    for name, rows in by.items():
        summary[name] = {"ood": mean_std([r["ood"] for r in rows]), "id": mean_std([r["id"] for r in rows])}
    for a, b in (("sgs", "dm"), ("sgs", "sgs_div0"), ("sgs_div0", "dm")):
        summary[f"{a}_minus_{b}"] = {
            m: {**mean_std([x[m] - y[m] for x, y in zip(by[a], by[b])]),
                "per_seed": [x[m] - y[m] for x, y in zip(by[a], by[b])]} for m in ("ood", "id")}
    report["summary"], report["complete"] = summary, len(seeds_done) == len(seeds)
    save()
    print(json.dumps(summary, indent=1))


def control(report, final_data, save):
    """Is it just a bigger step? g_sh is mostly a projection of g_DM, so SGS's update is ~(1 + λ_sh·r)·g_DM in
    norm (r = ‖g_sh‖/‖g_DM‖, measured). Control: DM with lr_img scaled by that factor, same seeds."""
    sgs_rows = [r for r in report["final"] if r["method"] == "sgs"]
    ratio = statistics.fmean(r["sgs"]["shared_norm_ratio_mean"] for r in sgs_rows)
    lr = 1.0 + report["chosen"]["lambda_sh"] * ratio
    rows = []
    for seed in SETTINGS["seeds"]:
        row = distill_and_evaluate("dm", {"lr_img": lr}, final_data, seed, SETTINGS["eval_models_final"])
        rows.append(row)
        print(f"seed {seed} dm lr_img={lr:.3f}: OOD(75) {row['ood']:.4f} ID {row['id']:.4f}", flush=True)
    dm_rows = [r for r in report["final"] if r["method"] == "dm"]
    report["control_dm_scaled_step"] = {
        "lr_img": lr, "shared_norm_ratio": ratio, "rows": rows,
        "ood": mean_std([r["ood"] for r in rows]), "id": mean_std([r["id"] for r in rows]),
        "sgs_minus_control": {"ood": mean_std([s["ood"] - c["ood"] for s, c in zip(sgs_rows, rows)]),
                              "id": mean_std([s["id"] - c["id"] for s, c in zip(sgs_rows, rows)])},
        "control_minus_dm": {"ood": mean_std([c["ood"] - d["ood"] for d, c in zip(dm_rows, rows)]),
                             "id": mean_std([c["id"] - d["id"] for d, c in zip(dm_rows, rows)])}}
    save()
    print(json.dumps({k: v for k, v in report["control_dm_scaled_step"].items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
