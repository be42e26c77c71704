"""Tests for the evaluation protocol on sklearn's 8x8 digits: accuracy, aggregation, seeds, metrics."""
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fastdd.evaluate import evaluate_synthetic, predict, train_and_evaluate
from fastdd.models import get_model

try:
    from fastdd.data import ImageDataset
except ImportError:
    ImageDataset = None

FAST = {"model": "MLP", "epochs": 100, "augment": None}


class DigitsStandIn:
    """Duck-typed stand-in for fastdd.data.ImageDataset (used until that class is importable)."""

    def __init__(self, images, labels, num_classes, mean, std, name, class_names, domains=None):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.mean, self.std, self.name, self.class_names, self.domains = mean, std, name, class_names, domains

    def normalize(self, images_uint8, device=None, dtype=torch.float32):
        x = images_uint8.to(device=device, dtype=dtype) / 255.0
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def make_dataset(images, labels, mean, std, name):
    dataset_type = ImageDataset if ImageDataset is not None else DigitsStandIn
    return dataset_type(images=images, labels=labels, num_classes=10, mean=mean, std=std, name=name,
                        class_names=[str(c) for c in range(10)])


@pytest.fixture(scope="module")
def digits():
    """(train, test) split of the 1797 digits: first 1000 for training, the rest for testing."""
    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    pixels = images[:1000].float() / 255
    mean, std = (float(pixels.mean()),), (float(pixels.std()),)
    return (make_dataset(images[:1000], labels[:1000], mean, std, "digits-train"),
            make_dataset(images[1000:], labels[1000:], mean, std, "digits-test"))


@pytest.fixture(scope="module")
def real_subset(digits):
    """10 random real training images per class, normalised: a 'synthetic set' initialised from real."""
    train, _ = digits
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for label in range(10):
        members = torch.nonzero(train.labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:10]])
    index = torch.cat(chosen)
    return train.normalize(train.images[index]), train.labels[index]


def test_real_images_give_accuracy_well_above_chance(digits, real_subset):
    images, labels = real_subset
    result = train_and_evaluate(images, labels, digits[1], **FAST)
    assert set(result) == {"accuracy", "train_loss"}
    assert isinstance(result["accuracy"], float) and result["accuracy"] > 0.5
    assert np.isfinite(result["train_loss"])


def test_convnet_learns_from_real_images(digits, real_subset):
    images, labels = real_subset
    result = train_and_evaluate(images, labels, digits[1], model="ConvNetD2", epochs=30, augment=None, width=32)
    assert result["accuracy"] > 0.5


def test_shuffled_labels_give_near_chance(digits, real_subset):
    images, labels = real_subset
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert train_and_evaluate(images, shuffled, digits[1], **FAST)["accuracy"] < 0.3


def test_same_seed_reproduces_and_leaves_global_rng_alone(digits, real_subset):
    images, labels = real_subset
    rng_state = torch.get_rng_state()
    first = train_and_evaluate(images, labels, digits[1], seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert train_and_evaluate(images, labels, digits[1], seed=3, **FAST) == first
    assert train_and_evaluate(images, labels, digits[1], seed=4, **FAST) != first


def test_evaluate_synthetic_aggregates_over_models_and_architectures(digits, real_subset):
    images, labels = real_subset
    results = evaluate_synthetic(images, labels, digits[1], models=("MLP", "ConvNetD2"), num_models=3,
                                 epochs=20, seed=7, augment=None, width=16)
    json.dumps(results)
    assert set(results) == {"MLP", "ConvNetD2"}
    mlp = results["MLP"]
    assert len(mlp["accuracies"]) == 3
    assert mlp["mean"] == pytest.approx(np.mean(mlp["accuracies"]))
    assert mlp["std"] == pytest.approx(np.std(mlp["accuracies"]))
    assert mlp["train_loss_mean"] == pytest.approx(np.mean(mlp["train_loss_values"]))
    second = train_and_evaluate(images, labels, digits[1], model="MLP", epochs=20, seed=8, augment=None, width=16)
    assert mlp["accuracies"][1] == second["accuracy"]


def test_extra_metrics_are_reported_and_aggregated(digits, real_subset):
    images, labels = real_subset
    test_set = digits[1]
    seen = []

    def class_zero_accuracy(model, dataset, predictions):
        assert not model.training and dataset is test_set
        assert torch.equal(predictions, predict(model, dataset, batch_size=100))
        seen.append(predictions)
        is_zero = dataset.labels == 0
        return {"class0_accuracy": (predictions[is_zero] == 0).float().mean()}

    results = evaluate_synthetic(images, labels, test_set, models="MLP", num_models=2, epochs=30, augment=None,
                                 extra_metrics=[class_zero_accuracy])["MLP"]
    assert len(seen) == 2
    assert len(results["class0_accuracy_values"]) == 2
    assert all(isinstance(value, float) for value in results["class0_accuracy_values"])
    assert results["class0_accuracy_mean"] == pytest.approx(np.mean(results["class0_accuracy_values"]))
    assert "class0_accuracy_std" in results
    json.dumps(results)


def test_extra_metric_cannot_overwrite_accuracy(digits, real_subset):
    images, labels = real_subset
    with pytest.raises(ValueError, match="accuracy"):
        train_and_evaluate(images, labels, digits[1], model="MLP", epochs=1, augment=None,
                           extra_metrics=[lambda model, dataset, predictions: {"accuracy": 1.0}])


def test_predict_is_independent_of_batch_size(digits):
    test_set = digits[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model("ConvNetD2", 1, 10, 8, width=16)
    predictions = predict(model, test_set, batch_size=64)
    assert predictions.shape == (len(test_set.labels),) and predictions.dtype == torch.long
    assert torch.equal(predictions, predict(model, test_set, batch_size=4096))


def test_rejects_empty_or_mismatched_sets(digits, real_subset):
    images, labels = real_subset
    with pytest.raises(ValueError):
        train_and_evaluate(images[:0], labels[:0], digits[1], model="MLP", epochs=1, augment=None)
    with pytest.raises(ValueError):
        train_and_evaluate(images, labels[:5], digits[1], model="MLP", epochs=1, augment=None)


def test_dsa_augmentation_trains_above_chance(digits, real_subset):
    augment_module = pytest.importorskip("fastdd.augment")
    if not hasattr(augment_module, "augment_per_sample"):
        pytest.skip("fastdd.augment.augment_per_sample is not available yet")
    images, labels = real_subset
    result = train_and_evaluate(images, labels, digits[1], model="MLP", epochs=100, augment="dsa")
    assert result["accuracy"] > 0.4
    assert train_and_evaluate(images, labels, digits[1], model="MLP", epochs=100, augment="dsa") == result
