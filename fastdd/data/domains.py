"""Domain datasets: Rotated-/Colored-MNIST builders, leave-one-domain-out splits and per-(class, domain) sampling."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .dataset import ImageDataset, channel_stats, stratified_test_mask
from .sampler import ClassSampler

ROTATED_MNIST_ANGLES = (0, 15, 30, 45, 60, 75)  # DomainBed's RotatedMNIST environments
# DomainBed's ColoredMNIST environments: (name, probability that the colour disagrees with the label)
COLORED_MNIST_ENVIRONMENTS = (("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9))


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate [N, C, H, W] images counter-clockwise by `angle` degrees about their centre (bilinear,
    zero fill, as torchvision's rotate), with one affine_grid/grid_sample call; uint8 in -> uint8 out."""
    if images.dim() != 4:
        raise ValueError(f"rotate_images: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.float() if images.dtype == torch.uint8 else images
    n, _, h, w = x.shape
    a = math.radians(float(angle))
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps output to input coordinates in [-1, 1] units; the aspect factors keep
    # non-square images undistorted. Output pixel p samples input R(-angle) p (y points down).
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _domain_order(n: int, num_domains: int, seed: int) -> torch.Tensor:
    """DomainBed's assignment: shuffle once, sample k of the shuffled order goes to domain k mod D."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    domains = torch.empty(n, dtype=torch.int64)
    domains[order] = torch.arange(n) % num_domains
    return domains


def rotated_mnist(source: ImageDataset, angles: Sequence[float] = ROTATED_MNIST_ANGLES, seed: int = 0,
                  name: str = "rotated-mnist") -> ImageDataset:
    """Rotated-MNIST from any MNIST-like set: each image lands in ONE domain (DomainBed protocol:
    shuffled, dealt round-robin) and is rotated by that domain's angle. Domain names are the angles
    ("0", "15", ...); normalisation stats stay the source's."""
    if len(angles) < 2:
        raise ValueError(f"rotated_mnist needs at least 2 angles, got {list(angles)}")
    domains = _domain_order(len(source), len(angles), seed)
    images = source.images.clone()
    for d, angle in enumerate(angles):
        rows = torch.nonzero(domains == d).flatten()
        if rows.numel():
            images[rows] = rotate_images(source.images[rows], angle)
    names = [f"{a:g}" for a in angles]
    return ImageDataset(images=images, labels=source.labels.clone(), num_classes=source.num_classes,
                        mean=source.mean, std=source.std, name=name, class_names=list(source.class_names),
                        domains=domains, domain_names=names)


def colored_mnist(source: ImageDataset, environments=COLORED_MNIST_ENVIRONMENTS, label_noise: float = 0.25,
                  downsample: bool = True, seed: int = 0, name: str = "colored-mnist") -> ImageDataset:
    """DomainBed's Colored-MNIST: binary label (digit >= 5) flipped with prob `label_noise`, colour =
    label flipped with each environment's probability, 2 channels (red, green) with the other zeroed;
    `downsample` halves the side (28 -> 14) as DomainBed does. Each image lands in ONE environment."""
    if source.channels != 1:
        raise ValueError(f"colored_mnist needs a 1-channel source, got {source.channels} channels")
    if len(environments) < 2:
        raise ValueError(f"colored_mnist needs at least 2 environments, got {list(environments)}")
    gen = torch.Generator().manual_seed(seed)
    n = len(source)
    domains = _domain_order(n, len(environments), seed)
    flip_prob = torch.tensor([float(p) for _, p in environments])[domains]
    labels = (source.labels >= 5).long() ^ (torch.rand(n, generator=gen) < label_noise).long()
    colors = labels ^ (torch.rand(n, generator=gen) < flip_prob).long()
    gray = source.images[:, :, ::2, ::2] if downsample else source.images
    images = gray.repeat(1, 2, 1, 1).contiguous()
    images[torch.arange(n), 1 - colors] = 0
    mean, std = channel_stats(images)
    return ImageDataset(images=images, labels=labels, num_classes=2, mean=mean, std=std, name=name,
                        class_names=["digit<5", "digit>=5"], domains=domains,
                        domain_names=[str(e) for e, _ in environments])


def domain_index(ds: ImageDataset, domain) -> int:
    """The index of `domain` (a name such as 75 / "75" / "art_painting") in ds.domain_names."""
    if ds.domains is None:
        raise ValueError(f"dataset {ds.name!r} has no domain labels (build it with rotated_mnist, colored_mnist, "
                         f"domain_folder or from_tensors(domains=...))")
    key = domain
    if isinstance(domain, float) and domain.is_integer():
        key = int(domain)
    if str(key) in ds.domain_names:
        return ds.domain_names.index(str(key))
    raise ValueError(f"holdout_domain {domain!r} is not a domain of {ds.name!r}; valid domains: "
                     f"{', '.join(ds.domain_names)}")


def present_domains(ds: ImageDataset) -> list[int]:
    if ds.domains is None:
        domain_index(ds, None)  # raises the "no domain labels" error
    return torch.unique(ds.domains).tolist()


def check_domain_coverage(ds: ImageDataset, domains: Sequence[int]) -> None:
    """Every class must have at least one sample in every domain listed (per-domain matching needs it)."""
    counts = torch.zeros(len(ds.domain_names), ds.num_classes, dtype=torch.int64)
    counts.index_put_((ds.domains, ds.labels), torch.ones_like(ds.labels), accumulate=True)
    for d in domains:
        missing = torch.nonzero(counts[d] == 0).flatten().tolist()
        if missing:
            names = [ds.class_names[c] for c in missing]
            raise ValueError(f"class {names[0]!r} has no samples in domain {ds.domain_names[d]!r} of {ds.name!r} "
                             f"(missing classes there: {names}); every source domain needs every class")


def source_domains(ds: ImageDataset, holdout=None) -> list[int]:
    """Domain indices with samples, minus the held-out one; needs >= 2 of them, each holding every class."""
    held = None if holdout is None else domain_index(ds, holdout)
    sources = [d for d in present_domains(ds) if d != held]
    if len(sources) < 2:
        names = [ds.domain_names[d] for d in sources]
        raise ValueError(f"domain generalisation needs at least 2 source domains, got {len(sources)} {names} in "
                         f"{ds.name!r}" + (f" after holding out {holdout!r}" if holdout is not None else ""))
    check_domain_coverage(ds, sources)
    return sources


def leave_one_domain_out(ds: ImageDataset, holdout) -> tuple[ImageDataset, ImageDataset]:
    """(source part: every domain but `holdout`, target part: the `holdout` domain); both keep all domain names."""
    held = domain_index(ds, holdout)
    if not bool((ds.domains == held).any()):
        raise ValueError(f"holdout_domain {holdout!r} has no samples in {ds.name!r}")
    source_domains(ds, holdout)
    return ds.subset(ds.domains != held), ds.subset(ds.domains == held)


def split_per_domain(ds: ImageDataset, test_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic split stratified by (class, domain): every domain keeps its class balance in both parts."""
    if ds.domains is None:
        domain_index(ds, None)
    groups = ds.labels * len(ds.domain_names) + ds.domains
    test = stratified_test_mask(groups, ds.num_classes * len(ds.domain_names), test_fraction, seed)
    return ds.subset(~test), ds.subset(test)


class DomainClassSampler:
    """Up to n random distinct indices of every (class, source domain) pair in one vectorised call.

    `domains` lists the source domain ids; rows of other domains are never drawn. sample() returns
    (index [M], class [M], domain position in `domains` [M]), grouped by class then domain.
    """

    def __init__(self, labels: torch.Tensor, domains: torch.Tensor, num_classes: int, source: Sequence[int]):
        self.num_classes, self.source = int(num_classes), [int(d) for d in source]
        position = torch.full((int(domains.max()) + 1 if domains.numel() else 1,), -1, dtype=torch.int64)
        position[torch.tensor(self.source, dtype=torch.int64)] = torch.arange(len(self.source))
        pos = position[domains]
        self.pool = torch.nonzero(pos >= 0).flatten()
        self.num_domains = len(self.source)
        group = labels[self.pool] * self.num_domains + pos[self.pool]
        self._sampler = ClassSampler(group, self.num_classes * self.num_domains)

    def sample(self, n_per_group: int, generator: torch.Generator | None = None):
        idx, group = self._sampler.sample(n_per_group, generator=generator)
        return self.pool[idx], group // self.num_domains, group % self.num_domains
