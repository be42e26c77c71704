"""Evaluation protocol on sklearn's 8x8 digits: schedule vs the reference's evaluate_synthset, accuracy, aggregation."""
import copy
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fastdd.evaluate import evaluate_synthetic, predict, train_and_evaluate
from fastdd.evaluate.protocol import derive_seeds, train_model
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


def reference_train(net, images, labels, epochs, shuffle_seed, augment=None, augment_seed=0, lr=0.01,
                    batch_size=256):
    """Oracle written from DC utils.evaluate_synthset/epoch: Epoch + 1 passes over shuffled batches (one
    randperm per pass, as RandomSampler draws), SGD(lr, momentum 0.9, weight_decay 5e-4); when
    ep == Epoch // 2 + 1 (after that pass) lr *= 0.1 and the optimiser is built anew. Returns the last
    pass's sample-weighted mean loss."""
    shuffle_generator = torch.Generator().manual_seed(shuffle_seed)
    augment_generator = torch.Generator().manual_seed(augment_seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion = torch.nn.CrossEntropyLoss()
    net.train()
    for ep in range(epochs + 1):
        loss_avg, num_exp = 0.0, 0
        order = torch.randperm(len(labels), generator=shuffle_generator)
        for batch in order.split(batch_size):
            img, lab = images[batch], labels[batch]
            if augment is not None:
                img = augment(img, augment_generator)
            loss = criterion(net(img), lab)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_avg += loss.item() * lab.shape[0]
            num_exp += lab.shape[0]
        if ep in [epochs // 2 + 1]:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    return loss_avg / num_exp


def noise_augment(x, generator):
    return x + 0.3 * torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("epochs,augment", [(4, None), (5, noise_augment), (1, None)])
def test_train_model_matches_reference_schedule(real_subset, epochs, augment):
    images, labels = real_subset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = get_model("MLP", 1, 10, 8, width=32)
    oracle_net = copy.deepcopy(net)
    loss = train_model(net, images, labels, epochs, 32, 0.05, torch.Generator().manual_seed(5), augment,
                       torch.Generator().manual_seed(6))
    oracle_loss = reference_train(oracle_net, images, labels, epochs, 5, augment, 6, lr=0.05, batch_size=32)
    for got, want in zip(net.parameters(), oracle_net.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(oracle_loss, rel=1e-5)


def test_train_and_evaluate_uses_reference_defaults_and_per_sample_dsa(digits):
    """batch 256 (two batches from 300 images), lr 0.01, DSA per sample with the full strategy."""
    pytest.importorskip("fastdd.augment").augment_per_sample
    from fastdd.augment import augment_per_sample
    train, test = digits
    images, labels = train.normalize(train.images[:300]), train.labels[:300]
    result = train_and_evaluate(images, labels, test, model="MLP", epochs=3, seed=11, augment="dsa")
    init_seed, shuffle_seed, augment_seed = derive_seeds(11, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = get_model("MLP", 1, 10, (8, 8))

    def dsa(x, generator):
        return augment_per_sample(x, generator, strategy="color_crop_cutout_flip_scale_rotate")

    oracle_loss = reference_train(net, images, labels, 3, shuffle_seed, dsa, augment_seed)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test.normalize(test.images)).argmax(1) == test.labels).float().mean())
    assert result["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(test.labels))
    assert result["train_loss"] == pytest.approx(oracle_loss, rel=1e-5)


def test_real_images_give_accuracy_well_above_chance(digits, real_subset):
    images, labels = real_subset
    result = train_and_evaluate(images, labels, digits[1], **FAST)
    assert result["accuracy"] > 0.5
    assert result["train_loss"] < np.log(10) / 2  # below half the loss of a uniform prediction


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
    mlp = results["MLP"]
    assert len(mlp["accuracies"]) == 3
    assert mlp["mean"] == pytest.approx(np.mean(mlp["accuracies"]))
    assert mlp["std"] == pytest.approx(np.std(mlp["accuracies"]))
    assert mlp["train_loss_mean"] == pytest.approx(np.mean(mlp["train_loss_values"]))
    second = train_and_evaluate(images, labels, digits[1], model="MLP", epochs=20, seed=8, augment=None, width=16)
    assert mlp["accuracies"][1] == second["accuracy"]
    third_conv = train_and_evaluate(images, labels, digits[1], model="ConvNetD2", epochs=20, seed=9, augment=None,
                                    width=16)
    assert results["ConvNetD2"]["accuracies"][2] == third_conv["accuracy"]


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
    is_zero = test_set.labels == 0
    expected = [float((predictions[is_zero] == 0).float().mean()) for predictions in seen]
    assert results["class0_accuracy_values"] == pytest.approx(expected)
    assert results["class0_accuracy_mean"] == pytest.approx(np.mean(expected))
    assert results["class0_accuracy_std"] == pytest.approx(np.std(expected))
    assert results["accuracies"] == pytest.approx([float((p == test_set.labels).float().mean()) for p in seen])
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
    model.eval()
    with torch.no_grad():
        direct = model(test_set.normalize(test_set.images)).argmax(dim=1)
    assert torch.equal(predictions, direct)
    assert torch.equal(predictions, predict(model, test_set, batch_size=4096))


def test_rejects_empty_or_mismatched_sets(digits, real_subset):
    images, labels = real_subset
    with pytest.raises(ValueError, match="empty synthetic set"):
        train_and_evaluate(images[:0], labels[:0], digits[1], model="MLP", epochs=1, augment=None)
    with pytest.raises(ValueError, match=r"M == len\(labels\)"):
        train_and_evaluate(images, labels[:5], digits[1], model="MLP", epochs=1, augment=None)


def test_dsa_augmentation_trains_above_chance(digits, real_subset):
    augment_module = pytest.importorskip("fastdd.augment")
    if not hasattr(augment_module, "augment_per_sample"):
        pytest.skip("fastdd.augment.augment_per_sample is not available yet")
    images, labels = real_subset
    result = train_and_evaluate(images, labels, digits[1], model="MLP", epochs=100, augment="dsa")
    assert result["accuracy"] > 0.4
    assert train_and_evaluate(images, labels, digits[1], model="MLP", epochs=100, augment="dsa") == result


def test_predict_batches_are_bounded_by_activation_bytes(monkeypatch):
    from fastdd.data import from_tensors
    from fastdd.evaluate import protocol
    from fastdd.models import get_model
    g = torch.Generator().manual_seed(0)
    test = from_tensors(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(10) % 2)
    torch.manual_seed(0)
    net = get_model("ConvNetW32", 3, 2, 16)
    sizes = []
    handle = net.register_forward_pre_hook(lambda m, inputs: sizes.append(inputs[0].shape[0]))
    whole = protocol.predict(net, test, device="cpu")
    from fastdd.distill.memory import activation_bytes_per_row
    per_row = activation_bytes_per_row(net, test.normalize(test.images[:1]), grad=False, forward=lambda n, x: n(x))
    assert per_row >= 32 * 16 * 16 * 4  # at least the first conv's output row
    monkeypatch.setattr(protocol, "PREDICT_BATCH_BYTES", 3 * per_row)
    sizes.clear()
    bounded = protocol.predict(net, test, device="cpu")
    handle.remove()
    assert sizes[1:] == [3, 3, 3, 1]  # (sizes[0]: the one-row probe's forward)
    assert torch.equal(bounded, whole)
