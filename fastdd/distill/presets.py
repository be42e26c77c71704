"""Config presets per (method family, dataset): `default` (quick runs) and `reference` (the papers' settings)."""
import copy
import dataclasses
from typing import Any, Callable

PRESETS = ("default", "reference")

# DM (VICO-UoE/DatasetCondensation main_DM.py + README): Iteration 20000, batch_real 256, image SGD
# momentum 0.5, real init, ConvNet, full DSA strategy, evaluation every 2000 iterations with 5 models
# (README's --num_eval 5) trained epoch_eval_train = 1000 epochs. lr_img stays None: the method's
# reference value (1.0; 10.0 at ipc >= 100). SGS and robust DD follow DM.
DM_REFERENCE = {"iterations": 20000, "batch_real": 256, "momentum": 0.5, "init": "real", "model": "ConvNet",
                "dsa_strategy": "color_crop_cutout_flip_scale_rotate", "lr_img": None, "eval_every": 2000,
                "eval_models": ["ConvNet"], "eval_num_models": 5, "eval_epochs": 1000}

# IDC (snu-mllab/Efficient-Dataset-Condensation argument.py + misc/reproduce.py, non-ImageNet): niter 2000,
# batch_real 64, mom_img 0.5, factor 2 (README's -f 2, 'mix' init), inner_loop 100, net_epoch 1,
# n_data 500 (cifar10: 2000), network SGD lr 0.01 / momentum 0.9 / wd 5e-4 / batch 64, batch_syn_max 128,
# matching augmentation color_crop_cutout, evaluation 1000 epochs. lr_img is tuned as lr * ipc / 10
# (tune_lr_img; the image-size ratio is 1 for 28x28 MNIST-like and 32x32 data).
IDC_COMMON = {"iterations": 2000, "batch_real": 64, "momentum": 0.5, "init": "real", "model": "ConvNet",
              "dsa_strategy": "color_crop_cutout", "eval_every": 0, "eval_models": ["ConvNet"],
              "eval_num_models": 5, "eval_epochs": 1000}
IDC_METHOD_COMMON = {"factor": 2, "inner_loop": 100, "net_epoch": 1, "n_data": 500, "net_batch": 64,
                     "net_lr": 0.01, "net_momentum": 0.9, "net_weight_decay": 5e-4, "batch_syn_max": 128,
                     "step_per_class": True, "init_mix": True}
# dataset -> (distance, base lr_img at ipc 10, overrides). MSE ('idc') for CIFAR-10/SVHN, L1 ('idc_l1') with
# lr 1e-4 for MNIST/Fashion; kmnist and digits are MNIST-like. reproduce.py has no CIFAR-100 entry: it gets
# argument.py's defaults (metric l1, lr_img 5e-3, n_data 500).
IDC_DATASETS = {
    "cifar10": ("idc", 5e-3, {"method_args": {"n_data": 2000}}),
    "svhn": ("idc", 5e-3, {}),
    "cifar100": ("idc_l1", 5e-3, {}),
    # MNIST at factor > 1: reproduce.py drops cutout from the matching augmentation.
    "mnist": ("idc_l1", 1e-4, {"dsa_strategy": lambda merged: (
        "color_crop" if merged["method_args"].get("factor", 2) > 1 else "color_crop_cutout")}),
    "fashion-mnist": ("idc_l1", 1e-4, {}),
    "kmnist": ("idc_l1", 1e-4, {}),
    "digits": ("idc_l1", 1e-4, {}),
}

# `default`: the embedded main job on `digits` stays short (about two minutes on a 2-core CPU). These are NOT
# the reference settings; run `--preset reference` for those.
DEFAULT_PRESETS = {("dm", "digits"): {"iterations": 100, "batch_real": 64},
                   ("gm", "digits"): {"iterations": 100, "batch_real": 64}}


def method_family(method: str, method_args: dict) -> str:
    """'gm' for gradient matching (gm, and dasm over gm), 'dm' for the distribution-matching methods."""
    if method == "gm":
        return "gm"
    if method == "dasm":
        return method_family(method_args.get("base", "gm"), {})
    return "dm"


def _idc_lr(base_lr: float) -> Callable[[dict], float]:
    def resolve(merged: dict) -> float:
        return base_lr * _matching_ipc(merged) / 10
    return resolve


def _matching_ipc(merged: dict) -> float:
    """Images per class one matching run optimises: ipc, or ipc / segments under dasm."""
    from fastdd.distill.config import DistillConfig
    ipc = merged.get("ipc", DistillConfig.ipc)
    if merged.get("method") != "dasm":
        return ipc
    from fastdd.distill.methods.dasm import DASMArgs
    own = {f.name for f in dataclasses.fields(DASMArgs)}
    args = DASMArgs(**{k: v for k, v in merged.get("method_args", {}).items() if k in own})
    if args.segments is not None:
        return ipc / args.segments
    if args.segment_ipc is not None:
        return args.segment_ipc
    return ipc / max(1, ipc // 10)


def _idc_dataset(dataset: str) -> str:
    """IDC's table row for `dataset`: itself, MNIST-like for derived MNIST sets, else SVHN's (MSE, n_data 500)."""
    if dataset in IDC_DATASETS:
        return dataset
    return "fashion-mnist" if "mnist" in dataset else "svhn"


def preset_values(preset: str, method: str, dataset: str, method_args: dict) -> dict[str, Any]:
    """The preset's config keys (values may be callables of the merged config) and its 'method_args'."""
    if preset not in PRESETS:
        raise ValueError(f"config key 'preset' must be one of {', '.join(PRESETS)}; got {preset!r}")
    family = method_family(method, method_args)
    if preset == "default":
        return dict(DEFAULT_PRESETS.get((family, dataset), {}))
    if family == "dm":
        return dict(DM_REFERENCE)
    distance, lr, extra = IDC_DATASETS[_idc_dataset(dataset)]
    values = {**IDC_COMMON, "lr_img": _idc_lr(lr),
              "method_args": {**IDC_METHOD_COMMON, "distance": distance, **extra.get("method_args", {})}}
    values.update({k: v for k, v in extra.items() if k != "method_args"})
    return values


def apply_preset(merged: dict) -> None:
    """Fill the keys of `merged` (and of merged['method_args']) the user did not set from its preset."""
    from fastdd.distill.config import DistillConfig
    method = merged.get("method", DistillConfig.method)
    dataset = merged.get("dataset", DistillConfig.dataset)
    method_args = merged.setdefault("method_args", {})
    values = preset_values(merged.get("preset", DistillConfig.preset), method, dataset, method_args)
    for key, value in values.pop("method_args", {}).items():
        method_args.setdefault(key, value)
    for key, value in values.items():
        if key not in merged:
            merged[key] = value(merged) if callable(value) else copy.deepcopy(value)
