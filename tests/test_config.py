"""Config presets: quick `default`, the papers' `reference` (DM, IDC per dataset), user keys win, resume keeps them."""
import pytest

from fastdd.distill import build_config


def test_default_preset_keeps_quick_digits_job_and_field_defaults():
    digits = build_config(overrides=[])
    assert (digits.preset, digits.iterations, digits.batch_real) == ("default", 100, 64)
    mnist = build_config(overrides=["dataset=mnist"])
    assert (mnist.iterations, mnist.batch_real, mnist.eval_epochs, mnist.eval_num_models) == (1000, 256, 300, 3)
    assert mnist.method_args == {}


@pytest.mark.parametrize("method", ["dm", "sgs", "robust"])
def test_reference_preset_is_dm_paper(method):
    cfg = build_config(overrides=[f"method={method}", "dataset=cifar10", "preset=reference"])
    assert (cfg.iterations, cfg.batch_real, cfg.eval_epochs, cfg.eval_num_models) == (20000, 256, 1000, 5)
    assert (cfg.momentum, cfg.init, cfg.model, cfg.eval_every, cfg.lr_img) == (0.5, "real", "ConvNet", 2000, None)
    assert cfg.dsa_strategy == "color_crop_cutout_flip_scale_rotate" and cfg.method_args == {}


@pytest.mark.parametrize("dataset,distance,lr,n_data,augment", [
    ("cifar10", "idc", 5e-3, 2000, "color_crop_cutout"),
    ("svhn", "idc", 5e-3, 500, "color_crop_cutout"),
    ("mnist", "idc_l1", 1e-4, 500, "color_crop"),
    ("fashion-mnist", "idc_l1", 1e-4, 500, "color_crop_cutout"),
    ("cifar100", "idc_l1", 5e-3, 500, "color_crop_cutout"),
])
def test_reference_preset_is_idc_per_dataset(dataset, distance, lr, n_data, augment):
    cfg = build_config(overrides=["method=gm", f"dataset={dataset}", "ipc=50", "preset=reference"])
    assert cfg.lr_img == pytest.approx(lr * 5)  # tune_lr_img: lr * ipc / 10
    assert (cfg.iterations, cfg.batch_real, cfg.momentum, cfg.eval_epochs, cfg.dsa_strategy) == (
        2000, 64, 0.5, 1000, augment)
    assert cfg.method_args == {"distance": distance, "n_data": n_data, "factor": 2, "inner_loop": 100,
                               "net_epoch": 1, "net_batch": 64, "net_lr": 0.01, "net_momentum": 0.9,
                               "net_weight_decay": 5e-4, "batch_syn_max": 128, "step_per_class": True,
                               "init_mix": True}


def test_mnist_keeps_cutout_without_multi_formation():
    cfg = build_config(overrides=["method=gm", "dataset=mnist", "preset=reference", "factor=1"])
    assert cfg.dsa_strategy == "color_crop_cutout" and cfg.method_args["factor"] == 1


def test_dasm_uses_its_base_family_and_segment_ipc_for_lr():
    cfg = build_config(overrides=["method=dasm", "dataset=mnist", "ipc=50", "segments=5", "preset=reference"])
    assert cfg.lr_img == pytest.approx(1e-4) and cfg.method_args["distance"] == "idc_l1"
    assert cfg.method_args["segments"] == 5
    over_dm = build_config(overrides=["method=dasm", "base=dm", "preset=reference"])
    assert over_dm.iterations == 20000 and over_dm.method_args == {"base": "dm"}


def test_user_keys_win_over_the_preset():
    cfg = build_config({"iterations": 7, "method": "gm"}, ["preset=reference", "n_data=3", "lr_img=0.5",
                                                          "eval_num_models=2"])
    assert (cfg.iterations, cfg.lr_img, cfg.eval_num_models) == (7, 0.5, 2)
    assert cfg.method_args["n_data"] == 3 and cfg.method_args["inner_loop"] == 100


def test_resolved_config_round_trips_unchanged():
    cfg = build_config(overrides=["method=gm", "dataset=mnist", "preset=reference", "iterations=9"])
    again = build_config(cfg.to_dict(), ["dataset=mnist"])
    assert again.to_dict() == cfg.to_dict()
    quick = build_config(overrides=["iterations=5", "batch_real=8"])
    assert build_config(quick.to_dict()).to_dict() == quick.to_dict()


def test_reference_preset_does_not_leak_between_configs():
    first = build_config(overrides=["preset=reference"])
    first.eval_models.append("MLP")
    assert build_config(overrides=["preset=reference"]).eval_models == ["ConvNet"]


@pytest.mark.parametrize("override,message", [("preset=paper", "'preset' must be one of default, reference"),
                                              ("log=wandb", "'log' must be one of none, tensorboard"),
                                              ("device=gpu0", "'device' must be auto, cpu")])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=[override])



@pytest.mark.parametrize("method,device,size,expected", [
    ("dm", "cpu", (28, 28), (True, 20)), ("dm", "cpu", (32, 32), (True, 16)), ("dm", "cpu", (64, 64), (True, 4)),
    ("dm", "cpu", (128, 128), (True, 2)), ("dm", "cpu", (8, 8), (True, 256)), ("dm", "cuda", (32, 32), (False, 256)),
    ("gm", "cpu", (32, 32), (False, 16)), ("dasm", "cpu", (32, 32), (False, 16)), ("sgs", "cpu", (32, 32), (True, 16)),
    ("robust", "cpu", (32, 32), (True, 16)),
])
def test_auto_layout_follows_device_image_size_and_method(method, device, size, expected):
    import torch
    from fastdd.distill.engine import resolve_layout
    from fastdd.distill.methods import build_method
    cfg = build_config(overrides=[f"method={method}"])
    assert (cfg.channels_last, cfg.micro_batch) == ("auto", "auto")
    assert resolve_layout(cfg, torch.device(device), size, build_method(method, None)) == expected


def test_robust_on_gm_takes_its_base_layout_and_explicit_values_win():
    import torch
    from fastdd.distill.engine import resolve_layout
    from fastdd.distill.methods import build_method
    cfg = build_config(overrides=["method=robust"])
    assert resolve_layout(cfg, torch.device("cpu"), (32, 32), build_method("robust", {"base": "gm"})) == (False, 16)
    cfg = build_config(overrides=["channels_last=false", "micro_batch=7"])
    assert resolve_layout(cfg, torch.device("cpu"), (32, 32), build_method("dm", None)) == (False, 7)


@pytest.mark.parametrize("override,key", [("channels_last=sometimes", "channels_last"), ("micro_batch=0", "micro_batch"),
                                          ("micro_batch=many", "micro_batch")])
def test_bad_layout_keys_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        build_config(overrides=[override])
