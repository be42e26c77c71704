"""Leave-one-domain-out run data for SGS: rotated-mnist, colored-mnist, domain-folder builders and OOD/ID metrics."""
from fastdd.data import ImageDataset, domain_folder
from fastdd.data.domains import colored_mnist, domain_index, rotated_mnist, source_domains, split_per_domain
from fastdd.data.mnist_pool import mnist_pool
from fastdd.distill.datasets import register_dataset

TEST_FRACTION = 0.3  # per (class, domain): 30% of every domain is test data (ID for sources, OOD for the holdout)
SPLIT_SEED = 0       # the data split is part of the dataset's identity, not of the run's seed


def domain_accuracy_metric(holdout: int, names: list[str]):
    """extra_metrics callable: OOD accuracy (held-out domain rows), ID accuracy (all other rows) and one
    `accuracy_domain_<name>` per domain, from the predictions on a test set carrying domain labels."""
    def metric(model, test_set, predictions) -> dict:
        correct = (predictions.cpu() == test_set.labels.cpu()).float()
        domains = test_set.domains.cpu()
        out = {"ood_accuracy": float(correct[domains == holdout].mean()),
               "id_accuracy": float(correct[domains != holdout].mean())}
        for d, name in enumerate(names):
            rows = domains == d
            if bool(rows.any()):
                out[f"accuracy_domain_{name}"] = float(correct[rows].mean())
        return out
    metric.holdout, metric.names = holdout, list(names)
    return metric


def domain_generalization_data(ds: ImageDataset, holdout, test_fraction: float = TEST_FRACTION,
                               seed: int = SPLIT_SEED):
    """(train, test, evaluators) for leave-one-domain-out: train = the distillation pool of the source domains,
    test = the test part of EVERY domain (the evaluator splits it into OOD / ID / per-domain accuracy)."""
    held = domain_index(ds, holdout)
    source_domains(ds, holdout)  # >= 2 sources, every class in each
    pool, test = split_per_domain(ds, test_fraction, seed)
    if not bool((test.domains == held).any()):
        raise ValueError(f"holdout_domain {holdout!r} has no test samples in {ds.name!r}")
    train = pool.subset(pool.domains != held)
    return train, test, [domain_accuracy_metric(held, ds.domain_names)]


def _holdout(config, default):
    value = config.method_args.get("holdout_domain")
    return default if value is None else value


@register_dataset("rotated-mnist")
def build_rotated_mnist(config):
    """Rotated-MNIST (0..75°, DomainBed); holdout_domain from the method keys, default 75."""
    return domain_generalization_data(rotated_mnist(mnist_pool(config.data_dir)), _holdout(config, 75))


@register_dataset("colored-mnist")
def build_colored_mnist(config):
    """Colored-MNIST (+90%, +80%, -90%, DomainBed); holdout_domain default -90%."""
    return domain_generalization_data(colored_mnist(mnist_pool(config.data_dir)), _holdout(config, "-90%"))


@register_dataset("domain-folder")
def build_domain_folder(config):
    """--data-dir root/<domain>/<class>/<image> (PACS, Office-Home, VLCS; images of one size); holdout_domain
    defaults to the last domain folder."""
    if not config.data_dir:
        raise ValueError("dataset 'domain-folder' needs --data-dir pointing at root/<domain>/<class>/<image>")
    ds = domain_folder(config.data_dir)
    return domain_generalization_data(ds, _holdout(config, ds.domain_names[-1]))
