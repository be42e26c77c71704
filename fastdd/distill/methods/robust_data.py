"""Robust DD evaluation and data: worst-cluster / worst-group accuracy evaluators and the subpop-mnist builders."""
import torch

from fastdd.cluster import batched_kmeans
from fastdd.data import ImageDataset
from fastdd.data.mnist_pool import mnist_pool
from fastdd.data.subpop import group_ids, make_subpop_shift
from fastdd.distill.datasets import register_dataset

EVAL_K = 4                    # test clusters per class for the worst-cluster ("Cluster-min") accuracy
EVAL_EMBEDDINGS = ("pixels", "random-net")
EVAL_SEED = 0                 # fixed: the test clusters are part of the metric, identical for every run / method
SUBPOP_SPLIT_SEED = 0         # the data split is part of the dataset's identity, not of the run's seed


def _features(test_set: ImageDataset, embedding: str, model: str) -> torch.Tensor:
    """[N, D] float32 CPU features of every test image: normalised pixels, or a fixed-seed random network's embed."""
    if embedding == "pixels":
        return test_set.normalize(test_set.images).flatten(1)
    from fastdd.models import get_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        net = get_model(model, test_set.channels, test_set.num_classes, test_set.image_size)
    net.eval()
    with torch.no_grad():
        return torch.cat([net.embed(test_set.normalize(test_set.images[i:i + 1024]))
                          for i in range(0, len(test_set), 1024)]).float()


def cluster_test_set(test_set: ImageDataset, k: int = EVAL_K, embedding: str = "pixels", model: str = "ConvNet"):
    """Cluster id in [0, k) of every test image: K-means inside each class (one batched call), fixed seed.

    A class with fewer than k test images is clustered with k = its size (singletons)."""
    feats = _features(test_set, embedding, model)
    labels = test_set.labels.long().cpu()
    counts = torch.bincount(labels, minlength=test_set.num_classes)
    k_eff = max(1, min(k, int(counts[counts > 0].min()) if bool((counts > 0).any()) else 1))
    gen = torch.Generator().manual_seed(EVAL_SEED)
    return batched_kmeans(feats, labels, test_set.num_classes, k_eff, generator=gen).labels


def _cell_accuracies(correct: torch.Tensor, cells: torch.Tensor, num_cells: int) -> torch.Tensor:
    """Accuracy of every non-empty cell (1-D, cells with no rows dropped)."""
    counts = torch.bincount(cells, minlength=num_cells)
    hits = torch.zeros(num_cells, dtype=torch.float64).index_add_(0, cells, correct.double())
    present = counts > 0
    return hits[present] / counts[present]


def worst_cluster_metric(k: int = EVAL_K, embedding: str = "pixels", model: str = "ConvNet"):
    """extra_metrics callable: `worst_cluster_accuracy` (min over the (class, test-cluster) cells, the paper's
    "Cluster-min") and `mean_cluster_accuracy` (their unweighted mean). Test clusters: per class, K-means (k) on a
    FIXED embedding of the test images (default normalised pixels, as the public code's evaluation; or a random
    ConvNet with seed 0), computed once per test set and cached."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"worst_cluster_metric: k must be a positive integer, got {k!r}")
    if embedding not in EVAL_EMBEDDINGS:
        raise ValueError(f"worst_cluster_metric: embedding must be one of {', '.join(EVAL_EMBEDDINGS)}; "
                         f"got {embedding!r}")
    cache: dict = {}

    def metric(net, test_set, predictions) -> dict:
        if cache.get("set") is not test_set:  # the set is held, so its id cannot be reused by another one
            cache["set"], cache["clusters"] = test_set, cluster_test_set(test_set, k, embedding, model)
        clusters = cache["clusters"]
        kk = int(clusters.max()) + 1 if clusters.numel() else 1
        labels = test_set.labels.long().cpu()
        correct = predictions.cpu() == labels
        acc = _cell_accuracies(correct, labels * kk + clusters, test_set.num_classes * kk)
        return {"worst_cluster_accuracy": float(acc.min()), "mean_cluster_accuracy": float(acc.mean())}
    metric.kind, metric.k, metric.embedding = "worst_cluster", k, embedding
    return metric


def worst_group_metric(group_names: list[str]):
    """extra_metrics callable for test sets with group labels (`domains`): `worst_group_accuracy` (min over
    (class, group) cells) and `accuracy_group_<name>` (accuracy over all rows of each group)."""
    names = list(group_names)

    def metric(net, test_set, predictions) -> dict:
        labels = test_set.labels.long().cpu()
        correct = predictions.cpu() == labels
        cells = group_ids(test_set).long().cpu()
        acc = _cell_accuracies(correct, cells, test_set.num_classes * len(names))
        out = {"worst_group_accuracy": float(acc.min())}
        domains = test_set.domains.cpu()
        for g, name in enumerate(names):
            rows = domains == g
            if bool(rows.any()):
                out[f"accuracy_group_{name}"] = float(correct[rows].double().mean())
        return out
    metric.kind, metric.names = "worst_group", names
    return metric


def subpop_data(pool: ImageDataset, transform: str = "rotate", seed: int = SUBPOP_SPLIT_SEED, **kw):
    """(train, test, evaluators): make_subpop_shift (5% rare subgroup per class in train, balanced test) with
    the worst-group and worst-cluster evaluators."""
    split = make_subpop_shift(pool, transform=transform, seed=seed, **kw)
    evaluators = [worst_group_metric(split.test.domain_names), worst_cluster_metric()]
    return split.train, split.test, evaluators


@register_dataset("subpop-mnist")
def build_subpop_mnist(config):
    """MNIST with 5% of each class's train images rotated 60-90° (rare group); group-balanced test split."""
    return subpop_data(mnist_pool(config.data_dir), "rotate")


@register_dataset("subpop-mnist-thin")
def build_subpop_mnist_thin(config):
    """MNIST with 5% of each class's train images stroke-thinned (rare group); group-balanced test split."""
    return subpop_data(mnist_pool(config.data_dir), "thin")
