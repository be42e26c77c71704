"""Resolves a run's dataset name to (train, test, evaluators); methods register builders for derived sets."""
from typing import Callable

from fastdd.data import DATASETS, load_dataset

# name -> builder(config) -> (train, test, extra_metrics list); e.g. rotated-mnist, subpop-mnist.
DATASET_BUILDERS: dict[str, Callable] = {}


def register_dataset(name: str):
    def wrap(fn):
        DATASET_BUILDERS[name] = fn
        return fn
    return wrap


def dataset_names() -> list[str]:
    return sorted(set(DATASETS) | set(DATASET_BUILDERS))


def load_run_data(config):
    """(train, test, evaluators) for config.dataset; data_dir points at files a user already has."""
    name = config.dataset
    if name in DATASET_BUILDERS:
        return DATASET_BUILDERS[name](config)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    train = load_dataset(name, split="train", root=config.data_dir, progress=config.progress)
    test = load_dataset(name, split="test", root=config.data_dir, progress=config.progress)
    return train, test, []
