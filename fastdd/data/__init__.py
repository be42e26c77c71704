"""fastdd.data: uint8 image datasets (built-in and users' own), stratified splits and a vectorised class sampler."""
from .dataset import ImageDataset, channel_stats, from_tensors, split_dataset
from .download import default_cache_dir
from .folders import domain_folder, from_npz, image_folder
from .registry import DATASETS, load_dataset
from .sampler import ClassSampler

__all__ = [
    "ImageDataset", "load_dataset", "DATASETS", "ClassSampler", "split_dataset", "from_tensors", "from_npz",
    "image_folder", "domain_folder", "default_cache_dir", "channel_stats",
]
