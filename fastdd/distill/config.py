"""Distillation run configuration: defaults, YAML + key=value overrides, validation naming the key."""
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from fastdd.distill.presets import PRESETS, apply_preset

LOGS = ("none", "tensorboard")


@dataclass
class DistillConfig:
    method: str = "dm"
    dataset: str = "digits"
    data_dir: str | None = None
    ipc: int = 10
    iterations: int = 1000
    batch_real: int = 256
    lr_img: float | None = None  # None: the method's reference default (DM: 1.0, 10.0 at ipc >= 100)
    momentum: float = 0.5
    init: str = "real"
    model: str = "auto"  # auto: the references' ConvNet depth for the resolution (ConvNet ≤32 px, D4 64, D5 128)
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    channels_last: bool | str = "auto"  # auto: on for the CPU (oneDNN's convolutions are faster in it), off on CUDA
    autocast_bf16: bool = False
    micro_batch: int | str = "auto"  # real rows per no-grad forward; auto: by image size on the CPU, 256 on CUDA
    memory_budget: str | int = "auto"  # bytes for activations, "8GB"/"512MiB", or auto (from free device memory / RAM)
    image_size: int | None = None  # imagefolder datasets: side length images are prepared at (None: 64)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False  # deterministic algorithms, no atomics in fastdd's kernels (bit-reproducible GPU runs)
    dist_timeout: int = 300  # seconds a torch.distributed collective may wait before the run stops (torchrun)
    eval_every: int = 0
    eval_models: list = field(default_factory=lambda: ["auto"])
    eval_num_models: int = 3
    eval_epochs: int = 300
    checkpoint_every: int = 100
    progress: bool = True
    preset: str = "default"  # default | reference (fastdd.distill.presets); fills only keys the user did not set
    log: str = "none"  # none | tensorboard (scalar events under <out>/tb)
    method_args: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = ("ipc", "iterations", "batch_real", "micro_batch", "eval_num_models", "eval_epochs", "dist_timeout")
        for name in positive:
            if name == "micro_batch" and self.micro_batch == "auto":
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config key {name!r} must be a positive integer, got {value!r}")
        if not isinstance(self.channels_last, bool) and self.channels_last != "auto":
            raise ValueError(f"config key 'channels_last' must be true, false or auto, got {self.channels_last!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"config key 'deterministic' must be true or false, got {self.deterministic!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config key {name!r} must be a non-negative integer, got {value!r}")
        if self.init not in ("real", "noise"):
            raise ValueError(f"config key 'init' must be one of real, noise; got {self.init!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"config key 'preset' must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.log not in LOGS:
            raise ValueError(f"config key 'log' must be one of {', '.join(LOGS)}; got {self.log!r}")
        if self.lr_img is not None and not self.lr_img > 0:
            raise ValueError(f"config key 'lr_img' must be > 0, got {self.lr_img!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 8):
            raise ValueError(f"config key 'image_size' must be an integer >= 8 or null, got {self.image_size!r}")
        from fastdd.distill.memory import parse_budget
        parse_budget(self.memory_budget)  # raises naming the key
        if isinstance(self.eval_models, str):
            self.eval_models = [m for m in self.eval_models.split(",") if m]
        if not isinstance(self.method_args, dict):
            raise ValueError("config key 'method_args' must be a mapping")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(DistillConfig))

# The field defaults above are quick settings, NOT the papers' (DM: 20000 iterations, 5 models x 1000 epochs):
# `preset=reference` (fastdd.distill.presets) sets every key to the paper's value for the method and dataset.


def parse_value(text: str) -> Any:
    """`key=value` values are read as YAML scalars/lists (1, 0.5, true, [a, b], null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_config(base: dict | None = None, overrides: list[str] | dict | None = None) -> DistillConfig:
    """Merge a YAML mapping and overrides (keys that are not config fields go to method_args), then fill the
    keys neither set from the preset (`preset` key; see fastdd.distill.presets)."""
    merged: dict = {}
    for source in (base or {}), _as_mapping(overrides):
        for key, value in source.items():
            if key == "method_args":
                merged.setdefault("method_args", {}).update(value or {})
            elif key in FIELDS:
                merged[key] = value
            else:
                merged.setdefault("method_args", {})[key] = value
    apply_preset(merged)
    return DistillConfig(**merged)


def _as_mapping(overrides) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return overrides
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def load_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return data
