"""fastdd.augment: batched siamese differentiable augmentation (DSA) matching the reference DiffAugment."""
from fastdd.augment.draw import AugDraw
from fastdd.augment.params import OP_NAMES, STRATEGY_DEFAULT, ParamDiffAug, parse_strategy
from fastdd.augment.siamese import SiameseAugment, augment_per_sample
from fastdd.augment.idc import IDCAugment, cutmix_loss, draw_cutmix  # noqa: F401  (IDC matching/net-training aug)

__all__ = ["AugDraw", "OP_NAMES", "ParamDiffAug", "STRATEGY_DEFAULT", "SiameseAugment",
           "augment_per_sample", "parse_strategy"]
