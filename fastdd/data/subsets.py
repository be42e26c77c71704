"""Built-in ImageNet class subsets (ImageNette, ImageWoof, IDC's ImageNet-10/100) with the source of each list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ClassSubset:
    wnids: tuple[str, ...]  # label order: label i is wnids[i]
    names: Optional[tuple[str, ...]]  # human-readable names, or None where the source gives none
    source: str


# Wnids: fastai/imagenette noisy_imagenette.csv folder names; names and wnid pairing: the fast.ai docs
# imagenette tutorial (https://docs.fast.ai/tutorial.imagenette.html, `lbl_dict`); class list in words:
# https://github.com/fastai/imagenette README ("tench, English springer, cassette player, ...").
# Order: sorted wnids, the order of the dataset's own train/<wnid> folders.
IMAGENETTE = ClassSubset(
    wnids=("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
           "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"),
    names=("tench", "English springer", "cassette player", "chain saw", "church",
           "French horn", "garbage truck", "gas pump", "golf ball", "parachute"),
    source="https://github.com/fastai/imagenette (README class list; wnids as in noisy_imagenette.csv) and "
           "https://docs.fast.ai/tutorial.imagenette.html (lbl_dict wnid -> name)")

# Wnids: the ten classes of fastai/imagenette noisy_imagewoof.csv (paths train/<wnid>/...); breeds from the
# fastai/imagenette README ("Australian terrier, Border terrier, Samoyed, Beagle, Shih-Tzu, English foxhound,
# Rhodesian ridgeback, Dingo, Golden retriever, Old English sheepdog"), paired with wnids by the ImageNet
# synset names. Order: sorted wnids.
IMAGEWOOF = ClassSubset(
    wnids=("n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
           "n02096294", "n02099601", "n02105641", "n02111889", "n02115641"),
    names=("Shih-Tzu", "Rhodesian ridgeback", "beagle", "English foxhound", "Border terrier",
           "Australian terrier", "golden retriever", "Old English sheepdog", "Samoyed", "dingo"),
    source="https://github.com/fastai/imagenette (README breed list; wnids from noisy_imagewoof.csv)")

# IDC (snu-mllab/Efficient-Dataset-Condensation data.py, ImageFolder.find_subclasses) reads `class100.txt`
# and, with its default --dseed 0 and phase 0, keeps lines [0, nclass) in file order: ImageNet-100 is the
# whole file, ImageNet-10 its first ten lines. That text file is not in the repository index we could read;
# its list is CMC's ImageNet-100 (https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt), taken here
# from two independent copies of that file which agree on every entry they share. IDC's ImageNet-10 =
# bonnet, green mamba, langur, Doberman, gyromitra, Saluki (gazelle hound), vacuum, window screen,
# cocktail shaker, garden spider.
_IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 "
    "n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 "
    "n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 "
    "n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 "
    "n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 "
    "n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 "
    "n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622").split()
_IDC_SOURCE = ("IDC, snu-mllab/Efficient-Dataset-Condensation data.py (find_subclasses: class100.txt lines "
               "[0, nclass)); list = CMC imagenet100.txt, https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt")
IMAGENET100 = ClassSubset(wnids=tuple(_IMAGENET100), names=None, source=_IDC_SOURCE)
IMAGENET10 = ClassSubset(
    wnids=tuple(_IMAGENET100[:10]),
    names=("bonnet", "green mamba", "langur", "Doberman", "gyromitra", "Saluki", "vacuum", "window screen",
           "cocktail shaker", "garden spider"),
    source=_IDC_SOURCE + " (first 10 lines); names: ImageNet synset words")

SUBSETS: dict[str, ClassSubset] = {
    "imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF, "imagenet10": IMAGENET10, "imagenet100": IMAGENET100,
}


def get_subset(name: str) -> ClassSubset:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SUBSETS:
        raise ValueError(f"unknown class subset {name!r}; valid: {', '.join(SUBSETS)}")
    return SUBSETS[key]
