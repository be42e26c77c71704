"""fastdd.data: uint8 image datasets (built-in, users' own, prepared memory-mapped shards), stratified splits
and a vectorised class sampler; `fastdd.data.prepare.prepare` writes the shards."""
from .dataset import ImageDataset, channel_stats, from_tensors, split_dataset
from .download import default_cache_dir
from .folders import domain_folder, from_npz, from_npz_splits, image_folder
from .registry import DATASETS, load_dataset
from .sampler import ClassSampler
from .shards import load_prepared, load_prepared_splits, read_manifest
from .subsets import SUBSETS

__all__ = [
    "ImageDataset", "load_dataset", "DATASETS", "ClassSampler", "split_dataset", "from_tensors", "from_npz",
    "from_npz_splits", "image_folder", "domain_folder", "default_cache_dir", "channel_stats", "load_prepared",
    "load_prepared_splits", "read_manifest", "SUBSETS",
]
