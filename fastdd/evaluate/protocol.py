"""DM's evaluation protocol: train fresh models on a synthetic set, test on real data, aggregate."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models import get_model, resolve_model_name

PREDICT_BATCH_BYTES = 512 * 2**20  # test-set forward: the largest layer's input + output per batch

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

ExtraMetric = Callable[[nn.Module, Any, torch.Tensor], dict]


def resolve_augmentation(augment: str | None) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """None/"none" -> no augmentation; "dsa" -> the full DSA strategy; any other string is passed
    to fastdd.augment.augment_per_sample as the strategy."""
    if augment is None or augment.lower() == "none":
        return None
    try:
        from fastdd.augment import augment_per_sample
    except ImportError as error:
        raise ImportError(f"augment={augment!r} needs fastdd.augment.augment_per_sample; "
                          "pass augment=None to train without augmentation") from error
    strategy = DSA_STRATEGY if augment.lower() == "dsa" else augment
    return lambda images, generator: augment_per_sample(images, generator, strategy=strategy)


def derive_seeds(seed: int, count: int) -> list[int]:
    return [int(value) for value in np.random.SeedSequence(seed).generate_state(count)]


@torch.no_grad()
def predict(model: nn.Module, test_set: Any, device: torch.device | str | None = None,
            batch_size: int = 2048) -> torch.Tensor:
    """Predicted labels [N] (int64, on CPU) for every image of `test_set`, in eval mode; batches hold at most
    `batch_size` images and at most PREDICT_BATCH_BYTES of the largest layer's input + output (64+ px nets)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if len(test_set.labels):
        from fastdd.distill.memory import activation_bytes_per_row  # (fastdd.distill imports this module)
        sample = test_set.normalize(test_set.images[:1], device=device)
        per_row = activation_bytes_per_row(model, sample, grad=False, forward=lambda net, x: net(x))
        batch_size = max(1, min(batch_size, PREDICT_BATCH_BYTES // max(per_row, 1)))
    predictions = []
    for start in range(0, len(test_set.labels), batch_size):
        batch = test_set.normalize(test_set.images[start:start + batch_size], device=device)
        predictions.append(model(batch).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                batch_size: int, lr: float, shuffle_generator: torch.Generator,
                augmentation: Callable | None, augment_generator: torch.Generator | None) -> float:
    """The reference's evaluate_synthset schedule: epochs + 1 passes (ep = 0..epochs) of SGD(momentum 0.9,
    wd 5e-4); after pass ep == epochs // 2 + 1 the optimiser is re-created with lr x 0.1 (momentum reset).
    Each batch is augmented per sample. Generators are CPU ones so a seed gives the same shuffles and
    augmentation draws on any device. Returns the last pass's mean training loss."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    model.train()
    decay_after = epochs // 2 + 1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs + 1):
        order = torch.randperm(len(labels), generator=shuffle_generator).to(images.device)
        loss_sum = torch.zeros((), device=images.device)
        for start in range(0, len(order), batch_size):
            batch_index = order[start:start + batch_size]
            batch_images = images[batch_index]
            if augmentation is not None:
                batch_images = augmentation(batch_images, augment_generator)
            loss = F.cross_entropy(model(batch_images), labels[batch_index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch_index)
        if epoch == decay_after:
            lr *= 0.1
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return float(loss_sum) / len(labels)


def train_and_evaluate(images: torch.Tensor, labels: torch.Tensor, test_set: Any, model: str = "ConvNet",
                       epochs: int = 300, seed: int = 0, augment: str | None = "dsa",
                       batch_size: int = 256, lr: float = 0.01, device: torch.device | str | None = None,
                       test_batch_size: int = 2048, extra_metrics: Iterable[ExtraMetric] | None = None,
                       **model_overrides: Any) -> dict:
    """Train a fresh `model` on (images, labels) and test it on `test_set`.
    images: normalised float [M, C, H, W]; labels: int64 [M]. Returns
    {"accuracy", "train_loss", **extra metrics}; the global RNG state is left untouched."""
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be [M, C, H, W] with M == len(labels); got {tuple(images.shape)} "
                         f"and {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot train on an empty synthetic set")
    device = torch.device(device) if device is not None else images.device
    images = images.detach().to(device=device, dtype=torch.float32)
    labels = labels.detach().to(device=device, dtype=torch.long)
    augmentation = resolve_augmentation(augment)
    init_seed, shuffle_seed, augment_seed = derive_seeds(seed, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        network = get_model(model, images.shape[1], test_set.num_classes, tuple(images.shape[2:]),
                            **model_overrides)
    network = network.to(device)
    shuffle_generator = torch.Generator().manual_seed(shuffle_seed)
    augment_generator = torch.Generator().manual_seed(augment_seed)
    train_loss = train_model(network, images, labels, epochs, batch_size, lr, shuffle_generator,
                             augmentation, augment_generator)
    network.eval()
    predictions = predict(network, test_set, device=device, batch_size=test_batch_size)
    test_labels = torch.as_tensor(test_set.labels).cpu()
    result = {"accuracy": float((predictions == test_labels).float().mean()), "train_loss": float(train_loss)}
    for metric in extra_metrics or ():
        for key, value in metric(network, test_set, predictions).items():
            if key in result:
                raise ValueError(f"extra metric key {key!r} clashes with an existing result key")
            result[key] = float(value)
    return result


def summarise(runs: Sequence[dict]) -> dict:
    """{"mean", "std", "accuracies"} over runs, plus "<key>_mean", "<key>_std", "<key>_values" for
    every other metric (train_loss and extra metrics). std is the population std (np.std)."""
    accuracies = [run["accuracy"] for run in runs]
    summary: dict[str, Any] = {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                               "accuracies": [float(value) for value in accuracies]}
    for key in runs[0]:
        if key == "accuracy":
            continue
        values = [float(run[key]) for run in runs]
        summary[f"{key}_mean"] = float(np.mean(values))
        summary[f"{key}_std"] = float(np.std(values))
        summary[f"{key}_values"] = values
    return summary


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test_set: Any,
                       models: Sequence[str] | str = ("auto",), num_models: int = 5, epochs: int = 300,
                       seed: int = 0, augment: str | None = "dsa", device: torch.device | str | None = None,
                       extra_metrics: Iterable[ExtraMetric] | None = None, **kw: Any) -> dict:
    """Train `num_models` fresh models per architecture (seeds seed, seed+1, ...) and aggregate:
    {name: {"mean", "std", "accuracies", "<metric>_mean", "<metric>_std", "<metric>_values"}}.
    Extra keywords go to train_and_evaluate (batch_size, lr, test_batch_size, model overrides)."""
    if isinstance(models, str):
        models = (models,)
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    extra_metrics = list(extra_metrics or ())
    results = {}
    for name in models:
        name = resolve_model_name(name, tuple(images.shape[2:]))  # "auto": the depth for the resolution
        runs = [train_and_evaluate(images, labels, test_set, model=name, epochs=epochs, seed=seed + index,
                                   augment=augment, device=device, extra_metrics=extra_metrics, **kw)
                for index in range(num_models)]
        results[name] = summarise(runs)
    return results
